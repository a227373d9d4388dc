"""Every error relay raises on purpose, with the HTTP status and code it maps to."""

from __future__ import annotations


class RelayError(Exception):
    """Base class: carries a stable machine code, an HTTP status and a WebSocket close code."""

    code = "internal_error"
    status = 500
    ws_close = 1011

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(RelayError):
    code = "bad_request"
    status = 400
    ws_close = 4400


class InvalidJSON(BadRequest):
    code = "invalid_json"


class InvalidMessage(BadRequest):
    code = "invalid_message"


class InvalidAfter(BadRequest):
    code = "invalid_after"


class InvalidParameter(BadRequest):
    code = "invalid_parameter"


class InvalidTitle(BadRequest):
    """A chat title that is not 1-200 characters of text on one line."""

    code = "invalid_title"
    status = 422


class ModelNotAllowed(BadRequest):
    code = "model_not_allowed"


class MessageTooLarge(RelayError):
    code = "message_too_large"
    status = 413
    ws_close = 1009


class NotFound(RelayError):
    code = "not_found"
    status = 404
    ws_close = 4404


class ChatNotFound(NotFound):
    code = "chat_not_found"


class StreamNotFound(NotFound):
    code = "stream_not_found"


class ChatBusy(RelayError):
    code = "chat_busy"
    status = 409
    ws_close = 4409


class IdempotencyInProgress(RelayError):
    """A request with the same Idempotency-Key is still being answered."""

    code = "idempotency_in_progress"
    status = 409
    ws_close = 4409


class IdempotencyKeyReused(RelayError):
    """The Idempotency-Key was used before with a different request body."""

    code = "idempotency_key_reused"
    status = 422
    ws_close = 4400


class TooManyRequests(RelayError):
    """A limit was reached; ``retry_after`` (seconds) goes out as Retry-After."""

    code = "rate_limited"
    status = 429
    ws_close = 1008

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = max(1, retry_after)


class TooManyRunning(TooManyRequests):
    code = "too_many_running"


class StreamFinished(RelayError):
    code = "stream_finished"
    status = 409
    ws_close = 4409


class IllegalTransition(RelayError):
    code = "illegal_transition"
    status = 409
    ws_close = 4409


class ForbiddenOrigin(RelayError):
    code = "forbidden_origin"
    status = 403
    ws_close = 4403


class Unauthorized(RelayError):
    code = "unauthorized"
    status = 401
    ws_close = 4401


class BrokerUnavailable(RelayError):
    code = "broker_unavailable"
    status = 503
    ws_close = 1013


class ServiceUnavailable(RelayError):
    """Redis or the database did not answer; the request may be retried."""

    code = "service_unavailable"
    status = 503
    ws_close = 1013  # try again later


class LogUnavailable(Exception):
    """The chunk log could not be reached for longer than the worker's budget
    (RELAY_BACKEND_BUDGET_S), or its state vanished (Redis lost its data): an infrastructure
    fault, not a generation failure."""


class LogBehind(Exception):
    """The log ends before an append's first seq: entries it had confirmed are gone (a
    Sentinel failover to a replica that had not received them yet). The writer sends them
    again from ``seq`` + 1; the append script never writes a gap."""

    def __init__(self, stream_id: str, seq: int) -> None:
        super().__init__(f"the log of stream {stream_id} ends at seq {seq}")
        self.seq = seq


class StaleAttempt(Exception):
    """This attempt no longer owns the stream: another attempt (or a cancel) fenced it off."""


class GenerationError(Exception):
    """A generator failed; the message is shown to viewers, so it must not carry secrets."""

    code = "generation_failed"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code:
            self.code = code


class CannotContinue(GenerationError):
    code = "cannot_continue"
