"""The OpenAPI 3.1 description of relay's HTTP API, served at ``GET /api/v1/openapi.json``.

Written by hand as data (docs/openapi.md says why no generator is used): every route of the
app with its parameters, request bodies, and every status the code can answer with its
schema. A few values come from the settings the process runs with (the longest message,
the models a post may name, the page size of the chat list), so the document describes this
server. tests/test_openapi.py keeps it true: the routes and methods match ``app.url_map``,
the document validates as OpenAPI 3.1, and live responses match their schemas;
tests/test_schemathesis.py fuzzes every operation against a live stack.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from flask import Flask, Response, jsonify

from models.exceptions import RelayError
from models.settings import DETACH_POLICIES, MAX_DETACH_S, MIN_DETACH_S, Settings
from ops.httperrors import CODES as GUNICORN_CODES
from web.idempotency import HEADER as IDEMPOTENCY_HEADER
from web.idempotency import MAX_KEY_CHARS

JSON = dict[str, Any]

PATH = "/api/v1/openapi.json"
OPENAPI_VERSION = "3.1.0"
ID_PATTERN = "^[A-Za-z0-9_-]{1,64}$"  # web.inputs.ID_PATTERN, anchored
# Codes of Werkzeug's HTTP errors that relay answers (web/errors.py: the status name,
# lower-cased; 413 is request_too_large), and of errors defined outside models.exceptions.
EXTRA_CODES = ("bad_request", "method_not_allowed", "not_found",
               "request_too_large", "unsupported_trigger")  # fmt: skip
SSE_HEADERS = ("Cache-Control", "X-Accel-Buffering")


def relay_version() -> str:
    try:
        return version("relay")
    except PackageNotFoundError:  # run from a checkout that was not installed
        return "0.0.0"


def error_codes() -> list[str]:
    """Every ``code`` an HTTP error can carry: relay's, Werkzeug's and gunicorn's own refusals
    (ops/httperrors.py: 414, 431, ... answered before relay reads the request)."""
    codes: set[str] = {*EXTRA_CODES, *GUNICORN_CODES.values()}
    todo: list[type[RelayError]] = [RelayError]
    while todo:
        cls = todo.pop()
        codes.add(cls.code)
        todo.extend(cls.__subclasses__())
    return sorted(codes)


# -- building blocks --------------------------------------------------------------------------


def ref(kind: str, name: str) -> JSON:
    return {"$ref": f"#/components/{kind}/{name}"}


def schema(name: str) -> JSON:
    return ref("schemas", name)


def json_body(body_schema: JSON) -> JSON:
    return {"application/json": {"schema": body_schema}}


def ok(description: str, body_schema: JSON, headers: JSON | None = None) -> JSON:
    out: JSON = {"description": description, "content": json_body(body_schema)}
    if headers:
        out["headers"] = headers
    return out


def error(description: str, *codes: str, headers: JSON | None = None) -> JSON:
    """An error response: the shape ``{"error": {"code", "message"}}`` with these codes."""
    narrowed = {"properties": {"error": {"properties": {"code": {"enum": list(codes)}}}}}
    body = {"allOf": [schema("Error"), narrowed]}
    return ok(f"{description} (`{'`, `'.join(codes)}`)", body, headers)


def no_content(description: str) -> JSON:
    return {"description": description}


def sse(description: str, event: str, headers: tuple[str, ...] = SSE_HEADERS) -> JSON:
    """A ``text/event-stream`` response; in OpenAPI 3.1 its schema describes one event (the
    fields of an SSE event block, ``data`` holding the JSON of the ``event`` schema)."""
    return {
        "description": description,
        "headers": {name: ref("headers", name) for name in headers},
        "content": {"text/event-stream": {"schema": schema(event)}},
    }


def common(*names: str) -> JSON:
    """Responses shared by many operations (components/responses), by status."""
    statuses = {
        "Unauthorized": "401",
        "ForbiddenOrigin": "403",
        "RequestTooLarge": "413",
        "TooManyRequests": "429",
        "UriTooLong": "414",
        "HeadersTooLarge": "431",
        "InternalError": "500",
        "Unavailable": "503",
    }
    return {statuses[name]: ref("responses", name) for name in names}


def param(name: str) -> JSON:
    return ref("parameters", name)


def accepted(description: str) -> JSON:
    """The 202 of an operation that queues an answer (a post, a regenerate)."""
    replayed = {"Idempotent-Replayed": ref("headers", "Idempotent-Replayed")}
    return {**ok(description, schema("PostAccepted"), replayed), "links": POSTED_LINKS}


def turn_events(description: str) -> JSON:
    """The 200 of a turn-starting post that asked for events (Accept: text/event-stream)."""
    replayed = ("Idempotent-Replayed", *SSE_HEADERS)
    return sse(description, "PostedSseEvent", replayed)


def send_errors() -> JSON:
    """The errors both ways of sending a message share (POST /api/v1/chat, the AI SDK's)."""
    return {
        "409": error(
            "The chat's answer is still being generated, or a request with the "
            "same Idempotency-Key is still being answered",
            "chat_busy",
            "idempotency_in_progress",
        ),
        "413": error(
            "The message or the body is too large", "message_too_large", "request_too_large"
        ),
        "422": error("The Idempotency-Key was used with another body", "idempotency_key_reused"),
        "503": error(
            "The task queue, Redis or the database is unreachable",
            "broker_unavailable",
            "service_unavailable",
        ),
    }


def operation(
    op_id: str, tag: str, summary: str, responses: JSON, description: str = "", **extra: Any
) -> JSON:
    out: JSON = {"operationId": op_id, "tags": [tag], "summary": summary}
    if description:
        out["description"] = description
    out.update(extra)
    out["responses"] = responses
    return out


def nullable(body_schema: JSON) -> JSON:
    return {"oneOf": [body_schema, {"type": "null"}]}


ALL: list[str] = []  # obj(ALL, ...): every property is required


def obj(required: list[str], properties: JSON, **extra: Any) -> JSON:
    """A closed object: a field the server adds must be documented first (the tests say so)."""
    return {
        "type": "object",
        "required": required if required is not ALL else list(properties),
        "properties": properties,
        "additionalProperties": False,
        **extra,
    }


STRING: JSON = {"type": "string"}
TIME: JSON = {"type": "string", "format": "date-time"}
ID: JSON = {"type": "string", "description": "A UUID4 string."}


# -- components -------------------------------------------------------------------------------


def schemas(settings: Settings) -> JSON:
    models = sorted({settings.model, *settings.allowed_models})
    error_info = obj(["code", "message"], {"code": STRING, "message": STRING})
    posted = {  # a turn-starting post's answer: 202's body, or a streamed post's first event
        "chatId": ID,
        "messageId": {**ID, "description": "The assistant message of the answer."},
        "userMessageId": ID,
        "streamId": ID,
        "ws": {"type": "string", "description": "/api/v1/streams/<streamId>/ws"},
        "events": {"type": "string", "description": "/api/v1/streams/<streamId>/events"},
    }
    text_part = obj(
        ["type", "text"],
        {"type": {"const": "text"}, "text": STRING, "state": {"enum": ["streaming", "done"]}},
    )
    return {
        "ErrorCode": {
            "description": "Stable, for programs; docs/api.md#errors lists when each occurs.",
            "enum": error_codes(),
        },
        "Error": obj(
            ["error"],
            {
                "error": obj(
                    ["code", "message"],
                    {
                        "code": schema("ErrorCode"),
                        "message": {"type": "string", "description": "For people."},
                    },
                )
            },
        ),
        "ErrorInfo": error_info,
        "Id": {"type": "string", "pattern": ID_PATTERN, "minLength": 1, "maxLength": 64},
        "Model": {
            "description": "A model this server allows (RELAY_MODEL, RELAY_ALLOWED_MODELS); "
            "absent or null: RELAY_MODEL.",
            "enum": [*models, None],
        },
        "PostChat": {
            "type": "object",
            "required": ["message"],
            "properties": {
                "message": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": settings.max_message_chars,
                    "pattern": r"\S",
                    "description": "Not only whitespace; no NUL and no lone surrogate "
                    "(400 `invalid_message`); longer than maxLength: 413 `message_too_large`.",
                },
                "chatId": {
                    "oneOf": [schema("Id"), {"type": "null"}],
                    "description": "Continue this chat; absent or null: a new chat. An empty "
                    "or non-string value is 400 `bad_request`; an id of no chat of this user, "
                    "404 `chat_not_found`.",
                },
                "interrupt": {
                    "type": "boolean",
                    "description": "Only `true` counts: cancel the chat's running answer.",
                },
                "model": schema("Model"),
                "onDetach": schema("OnDetach"),
            },
            "description": f"Other fields are ignored. The whole body is at most "
            f"{settings.max_request_bytes} bytes (413 `request_too_large`).",
        },
        "PostAccepted": obj(ALL, posted),
        "PostTurn": obj(
            ALL,
            {"type": {"const": "turn"}, **posted},
            description="A streamed post's first event: the fields of its 202 body.",
        ),
        "ChatSummary": obj(
            ["id", "title", "createdAt", "updatedAt"],
            {"id": ID, "title": STRING, "createdAt": TIME, "updatedAt": TIME},
        ),
        "ChatList": obj(["chats"], {"chats": {"type": "array", "items": schema("ChatSummary")}}),
        "RenameChat": {
            "type": "object",
            "required": ["title"],
            "properties": {
                "title": {
                    "type": "string",
                    "minLength": 1,
                    "description": "Stripped, then 1-200 characters without control "
                    "characters or line breaks; otherwise 422 `invalid_title`.",
                },
            },
            "description": "Other fields are ignored.",
        },
        "Regenerate": {
            "type": "object",
            "properties": {
                "model": {
                    **schema("Model"),
                    "description": "Absent or null: the model of the answer replaced (while "
                    "it is allowed), else RELAY_MODEL.",
                },
            },
            "description": "Optional (no body: the same as `{}`). Other fields are ignored.",
        },
        "ModelList": obj(
            ALL,
            {
                "default": {**STRING, "description": "RELAY_MODEL: a post without `model`."},
                "models": {
                    "type": "array",
                    "items": STRING,
                    "minItems": 1,
                    "description": "Every model a post may name, the default first.",
                },
            },
        ),
        "Message": obj(
            ["id", "role", "content", "status", "streamId", "streamSeq", "createdAt", "error"],
            {
                "id": ID,
                "role": {"enum": ["user", "assistant"]},
                "content": STRING,
                "status": {"enum": ["pending", "streaming", "complete", "cancelled", "failed"]},
                "streamId": nullable(ID),
                "streamSeq": nullable({"type": "integer", "minimum": 0}),
                "createdAt": TIME,
                "error": nullable(schema("ErrorInfo")),
                "model": nullable(STRING),
                "usage": nullable(
                    obj(
                        ["promptTokens", "completionTokens"],
                        {
                            "promptTokens": {"type": "integer", "minimum": 0},
                            "completionTokens": {"type": "integer", "minimum": 0},
                        },
                    )
                ),
                "finishReason": nullable(STRING),
            },
            description="Assistant messages also carry `model`, `usage` and `finishReason`.",
        ),
        "ChatDetail": obj(
            ["id", "title", "createdAt", "updatedAt", "messages"],
            {
                "id": ID,
                "title": STRING,
                "createdAt": TIME,
                "updatedAt": TIME,
                "messages": {"type": "array", "items": schema("Message")},
            },
        ),
        "StreamStatus": {"enum": ["queued", "running", "done", "cancelled", "failed"]},
        "Stream": obj(
            ALL,
            {
                "id": ID,
                "status": schema("StreamStatus"),
                "lastSeq": {"type": "integer", "minimum": 0},
                "attempt": {"type": "integer", "minimum": 0},
                "chatId": ID,
                "messageId": ID,
                "createdAt": TIME,
                "startedAt": nullable(TIME),
                "finishedAt": nullable(TIME),
                "updatedAt": TIME,
                "error": nullable(schema("ErrorInfo")),
                "endReason": nullable(
                    {"enum": ["abandoned"], "description": "Cancelled by the detach policy."}
                ),
                "onDetach": schema("DetachStatus"),
            },
        ),
        "OnDetach": {
            "description": "What happens when no viewer is attached any more (absent: the "
            "server's RELAY_ON_DETACH): go on to the end, or cancel the answer (reason "
            "`abandoned`, text kept) once none has been attached for `seconds` (absent: "
            "RELAY_ON_DETACH_SECONDS). Anything else is 400 `invalid_parameter`.",
            "oneOf": [
                {"enum": list(DETACH_POLICIES)},
                obj(
                    ["policy"],
                    {
                        "policy": {"enum": list(DETACH_POLICIES)},
                        "seconds": {
                            "type": "integer",
                            "minimum": MIN_DETACH_S,
                            "maximum": MAX_DETACH_S,
                        },
                    },
                ),
            ],
        },
        "DetachStatus": obj(
            ["policy"],
            {
                "policy": {"enum": list(DETACH_POLICIES)},
                "seconds": {"type": "integer", "minimum": MIN_DETACH_S},
                "watched": {
                    "type": "boolean",
                    "description": "While queued or running: a viewer is attached now.",
                },
                "cancelAt": nullable(
                    {
                        **TIME,
                        "description": "While queued or running and nobody watches: when it "
                        "is cancelled unless a viewer attaches (the Redis server's clock).",
                    }
                ),
            },
        ),
        "CancelAccepted": obj(
            ["streamId", "status"],
            {"streamId": STRING, "status": {"enum": ["cancelling", "cancelled"]}},
        ),
        "RetryAccepted": obj(
            ALL,
            {
                "streamId": ID,
                "chatId": ID,
                "messageId": ID,
                "status": {"const": "queued"},
                "resumedSeq": {"type": "integer", "minimum": 1},
                "ws": STRING,
                "events": STRING,
            },
        ),
        "Event": {
            "description": "One event of a stream, as an SSE `data:` line or a WebSocket "
            "message (docs/api.md#events); `chunks` only with `batch=1`.",
            "oneOf": [
                obj(
                    ["type", "seq", "text"],
                    {"type": {"const": "chunk"}, "seq": {"type": "integer"}, "text": STRING},
                ),
                obj(
                    ["type", "seq", "texts"],
                    {
                        "type": {"const": "chunks"},
                        "seq": {"type": "integer"},
                        "texts": {"type": "array", "items": STRING},
                    },
                ),
                obj(
                    ["type", "seq", "messageId"],
                    {"type": {"const": "done"}, "seq": {"type": "integer"}, "messageId": ID},
                ),
                obj(
                    ["type", "seq"],
                    {
                        "type": {"const": "cancelled"},
                        "seq": {"type": "integer"},
                        "reason": {
                            "enum": ["abandoned"],
                            "description": "Absent when a person cancelled it.",
                        },
                    },
                ),
                obj(
                    ["type", "seq", "error"],
                    {
                        "type": {"const": "error"},
                        "seq": {"type": "integer"},
                        "error": schema("ErrorInfo"),
                    },
                ),
                obj(
                    ["type", "seq", "attempt"],
                    {
                        "type": {"const": "resumed"},
                        "seq": {"type": "integer"},
                        "attempt": {"type": "integer"},
                    },
                ),
            ],
        },
        "SseEvent": obj(
            ["event", "id", "data"],
            {
                "event": {"enum": ["chunk", "chunks", "done", "cancelled", "error", "resumed"]},
                "id": {"type": "string", "pattern": "^[0-9]+$", "description": "The seq."},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": schema("Event"),
                },
                "retry": {"type": "integer"},
            },
            description="One SSE event block of a stream (docs/api.md#sse); the body starts "
            "with `retry: 1000` and may carry `: keepalive` comments.",
        ),
        "PostedSseEvent": {
            "description": "One SSE event block of a post that asked for events: first a "
            "`turn` event (no `id`: Last-Event-ID stays put), then the stream's events as "
            "GET /api/v1/streams/{stream_id}/events serves them.",
            "oneOf": [
                obj(
                    ["event", "data"],
                    {
                        "event": {"const": "turn"},
                        "data": {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "contentSchema": schema("PostTurn"),
                        },
                        "retry": {"type": "integer"},
                    },
                ),
                schema("SseEvent"),
            ],
        },
        "UIStreamPart": {
            "description": "A part of the AI SDK's UI message stream (docs/ai-sdk.md).",
            "oneOf": [
                obj(ALL, {"type": {"const": "start"}, "messageId": ID}),
                obj(ALL, {"type": {"enum": ["text-start", "text-end"]}, "id": STRING}),
                obj(ALL, {"type": {"const": "text-delta"}, "id": STRING, "delta": STRING}),
                obj(
                    ALL,
                    {
                        "type": {"const": "finish"},
                        "finishReason": {
                            "enum": ["stop", "length", "content-filter", "tool-calls", "other"]
                        },
                    },
                ),
                obj(ALL, {"type": {"const": "abort"}, "reason": STRING}),
                obj(ALL, {"type": {"const": "error"}, "errorText": STRING}),
            ],
        },
        "UIStreamEvent": obj(
            ["data"],
            {
                "event": {"const": "message"},
                "data": {
                    "anyOf": [
                        {"const": "[DONE]"},
                        {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "contentSchema": schema("UIStreamPart"),
                        },
                    ]
                },
            },
            description="One `data:` line of the UI message stream; the last is `[DONE]`.",
        ),
        "TextPart": text_part,
        "UIMessage": {
            "type": "object",
            "description": "An AI SDK UIMessage of the history (ignored: relay's SQL history is "
            "the conversation).",
            "properties": {
                "id": STRING,
                "role": {"enum": ["user", "assistant", "system"]},
                "parts": {"type": "array", "items": {"type": "object"}},
            },
        },
        "UserUIMessage": {
            "type": "object",
            "required": ["parts"],
            "description": "The new turn: the user's UIMessage. Its text is its `text` parts' "
            "texts joined with newlines; other parts are ignored.",
            "properties": {
                "id": STRING,
                "role": {"const": "user"},
                "parts": {
                    "type": "array",
                    "items": {"type": "object"},
                    "contains": {
                        "type": "object",
                        "required": ["type", "text"],
                        "properties": {
                            "type": {"const": "text"},
                            "text": {
                                "type": "string",
                                "pattern": r"\S",
                                "maxLength": settings.max_message_chars,
                            },
                        },
                    },
                },
            },
        },
        "AiSdkSend": {
            "type": "object",
            "required": ["id"],
            "description": "The DefaultChatTransport's body `{id, messages, trigger}`, or "
            "`{id, message}`. The new turn is `message`, else the last of `messages`: it must "
            "be the user's (role `user` or absent) with text in its `text` parts, joined with "
            f"newlines: not only whitespace, at most {settings.max_message_chars} characters "
            "(400 `invalid_message`, 413 `message_too_large`). The body is at most "
            f"{settings.max_request_bytes * 16} bytes. Other fields are ignored.",
            "properties": {
                "id": {**schema("Id"), "description": "The client's chat id (per user)."},
                "message": schema("UserUIMessage"),
                "messages": {
                    "type": "array",
                    "minItems": 1,
                    "items": schema("UIMessage"),
                    "description": "Without `message`, the last item is the new turn (a "
                    "`UserUIMessage`).",
                },
                "trigger": {
                    "enum": ["submit-message", None],
                    "description": "`regenerate-message` is 400 `unsupported_trigger`.",
                },
                "messageId": {
                    "type": "null",
                    "description": "Set (an edited message): 400 `unsupported_trigger`.",
                },
                "interrupt": {"type": "boolean"},
                "model": schema("Model"),
                "onDetach": schema("OnDetach"),
            },
            "anyOf": [{"required": ["message"]}, {"required": ["messages"]}],
        },
        "AiSdkStop": {
            "type": "object",
            "description": "Optional; any other body is read as none.",
            "properties": {"messageId": nullable(STRING)},
        },
        "StopResult": obj(
            ["status", "messageId"],
            {"status": {"enum": ["cancelled", "cancelling", "none"]}, "messageId": nullable(ID)},
        ),
        "UIMessageOut": obj(
            ["id", "role", "parts"],
            {
                "id": ID,
                "role": {"enum": ["user", "assistant"]},
                "parts": {"type": "array", "maxItems": 1, "items": text_part},
            },
        ),
        "Health": obj(["status"], {"status": {"const": "ok"}}),
        "Ready": obj(
            ["status", "checks"],
            {
                "status": {"enum": ["ok", "unavailable"]},
                "checks": obj(
                    ["redis", "database"],
                    {
                        "redis": {"type": "string", "description": "`ok` or `error: <class>`"},
                        "database": {"type": "string", "description": "`ok` or `error: <class>`"},
                    },
                ),
            },
        ),
    }


def parameters(settings: Settings) -> JSON:
    def path_id(name: str, description: str) -> JSON:
        return {
            "name": name,
            "in": "path",
            "required": True,
            "description": description,
            "schema": schema("Id"),
        }

    return {
        "ChatId": path_id(
            "chat_id", "A chat id; one no id can be (not 1-64 of A-Z a-z 0-9 _ -) is 404."
        ),
        "StreamId": path_id(
            "stream_id", "A stream id; one no id can be (not 1-64 of A-Z a-z 0-9 _ -) is 404."
        ),
        "ClientChatId": path_id(
            "chat", "The client's chat id. One no chat can have names nothing (no 404)."
        ),
        "After": {
            "name": "after",
            "in": "query",
            "description": "The last seq the client has seen (0 or absent: from the start). "
            "Malformed, or beyond the stream's last event: 400 `invalid_after`.",
            "schema": {"type": "integer", "minimum": 0},
        },
        "Batch": {
            "name": "batch",
            "in": "query",
            "description": "`1`/`true`: runs of chunks may come as one `chunks` event. Other "
            "values than these and `0`/`false`: 400 `invalid_parameter`.",
            "schema": {"enum": ["0", "1", "true", "false"]},
        },
        "LastEventId": {
            "name": "Last-Event-ID",
            "in": "header",
            "description": "Sent by an EventSource on reconnect; wins over `after`.",
            "schema": {"type": "string", "pattern": "^[0-9]+$"},
        },
        "IdempotencyKey": {
            "name": IDEMPOTENCY_HEADER,
            "in": "header",
            "description": "Answer once: the same key and body within 24 h (per user) get the "
            "first answer again and start nothing; another body: 422 "
            "`idempotency_key_reused`; while the first is still answered: 409 "
            "`idempotency_in_progress`. Malformed: 400 `bad_request`.",
            "schema": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_KEY_CHARS,
                "pattern": "^[!-~]([ -~]*[!-~])?$",
            },
        },
        "Query": {
            "name": "q",
            "in": "query",
            "description": "Only chats whose title contains this text, ignoring case (`%` and "
            "`_` match themselves). Blank: no filter. Over 200 characters or a NUL: 400 "
            "`bad_request`.",
            "schema": {"type": "string"},
        },
        "Limit": {
            "name": "limit",
            "in": "query",
            "description": "Fewer chats than the page size; anything else is 400 `bad_request`.",
            "schema": {"type": "integer", "minimum": 1, "maximum": settings.list_page_size},
        },
    }


def headers() -> JSON:
    return {
        "Retry-After": {
            "description": "Seconds to wait before trying again.",
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
        },
        "Idempotent-Replayed": {
            "description": "`true` when this is the stored answer of an earlier request with "
            "the same Idempotency-Key.",
            "schema": {"const": "true"},
        },
        "Cache-Control": {"schema": {"const": "no-cache"}},
        "X-Accel-Buffering": {
            "description": "Tells nginx not to buffer the stream.",
            "schema": {"const": "no"},
        },
        "X-Vercel-AI-UI-Message-Stream": {"schema": {"const": "v1"}},
    }


def responses() -> JSON:
    return {
        "Unauthorized": error("The bearer token is not valid", "unauthorized"),
        "ForbiddenOrigin": error(
            "A write from an Origin (or a cross-site Sec-Fetch-Site) that is not allowed: "
            "send the server's own origin, one in RELAY_ALLOWED_ORIGINS, or no Origin",
            "forbidden_origin",
        ),
        "RequestTooLarge": error(
            "The body is larger than RELAY_MAX_REQUEST_BYTES", "request_too_large"
        ),
        "TooManyRequests": error(
            "A limit was reached (RELAY_MAX_RUNNING_PER_USER, RELAY_POSTS_PER_MINUTE, "
            "RELAY_NEW_GUESTS_PER_MINUTE)",
            "rate_limited",
            "too_many_running",
            headers={"Retry-After": ref("headers", "Retry-After")},
        ),
        "UriTooLong": error(
            "The request line is longer than gunicorn's limit_request_line (4,094 bytes): "
            "answered by gunicorn before relay reads the request",
            "request_uri_too_large",
        ),
        "HeadersTooLarge": error(
            "A header is longer than gunicorn's limit_request_field_size (8,190 bytes), or "
            "there are more than 100 headers: answered by gunicorn",
            "request_header_fields_too_large",
        ),
        "InternalError": error("An unexpected server error (logged)", "internal_error"),
        "Unavailable": error(
            "Redis or the database did not answer, or the process is too busy; retry shortly",
            "service_unavailable",
        ),
    }


def security_schemes() -> JSON:
    return {
        "guestSession": {
            "type": "apiKey",
            "in": "cookie",
            "name": "session",
            "description": "Flask's signed session cookie with the guest's user id. A request "
            "without it (and without a bearer token) is a new guest: the answer sets it.",
        },
        "bearerToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API user's token from `flask --app web create-token NAME`; "
            "an unknown one is 401 `unauthorized`. Wins over the cookie.",
        },
        "metricsToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "RELAY_METRICS_TOKEN, when set, for GET /metrics.",
        },
    }


# -- paths ------------------------------------------------------------------------------------

WRITE_NOTE = (
    "Writes are Origin-checked: the server's own origin, one in RELAY_ALLOWED_ORIGINS, or no "
    "Origin and no cross-site Sec-Fetch-Site (403 `forbidden_origin` otherwise)."
)
PUBLIC: list[JSON] = [{}]  # no identity needed
STREAMED_NOTE = (
    "With `Accept: text/event-stream` (preferred to JSON): the turn is stored and queued as "
    "for 202, and the answer comes on this response: a `turn` event with the 202's fields, "
    "then the stream's events. A retry with the same Idempotency-Key starts nothing and "
    "resumes after Last-Event-ID / `after` (400 `invalid_after` without a key, or for a key "
    "no post has used)."
)
# A turn-starting post: its key, and (with Accept: text/event-stream) where a retry resumes.
TURN_PARAMETERS = [param("IdempotencyKey"), param("After"), param("Batch"), param("LastEventId")]


def link(op_id: str, parameter: str, source: str) -> JSON:
    return {"operationId": op_id, "parameters": {parameter: f"$response.body#/{source}"}}


# What a client does next with a posted turn (also how schemathesis' stateful phase chains).
POSTED_LINKS: JSON = {
    "GetChat": link("getChat", "chat_id", "chatId"),
    "DeleteChat": link("deleteChat", "chat_id", "chatId"),
    "RenameChat": link("renameChat", "chat_id", "chatId"),
    "RegenerateAnswer": link("regenerateAnswer", "chat_id", "chatId"),
    "ResumeChat": link("resumeChat", "chatId", "chatId"),
    "GetStream": link("getStream", "stream_id", "streamId"),
    "StreamEvents": link("streamEvents", "stream_id", "streamId"),
    "CancelStream": link("cancelStream", "stream_id", "streamId"),
    "RetryStream": link("retryStream", "stream_id", "streamId"),
}


def chat_paths(settings: Settings) -> JSON:
    resume_note = (
        "The chat's running answer as SSE (as GET /api/v1/streams/{stream_id}/events); else, "
        "when `after` / `Last-Event-ID` is 0 or absent, an answer completed in the last "
        f"{settings.resume_fallback_s:g} s as one `chunk` and `done` (seq 1 and 2); else 204."
    )
    return {
        "/api/v1/chat": {
            "post": operation(
                "postChat",
                "chats",
                "Post a user message and start its answer",
                description=WRITE_NOTE,
                parameters=TURN_PARAMETERS,
                requestBody={"required": True, "content": json_body(schema("PostChat"))},
                responses={
                    "200": turn_events(STREAMED_NOTE),
                    "202": accepted("Accepted: the turn is stored and its answer queued."),
                    "400": error(
                        "The body or a header is not acceptable",
                        "invalid_json",
                        "invalid_message",
                        "bad_request",
                        "model_not_allowed",
                        "invalid_parameter",
                        "invalid_after",
                    ),
                    "404": error("No such chat for this user", "chat_not_found"),
                    **send_errors(),
                    **common("Unauthorized", "ForbiddenOrigin", "TooManyRequests", "InternalError"),
                },
            ),
            "get": operation(
                "resumeChat",
                "streams",
                "Resume a chat over SSE",
                description=resume_note,
                parameters=[
                    {
                        "name": "chatId",
                        "in": "query",
                        "required": True,
                        "description": "Missing or empty: 400 `bad_request`; not an id: 404.",
                        "schema": schema("Id"),
                    },
                    param("After"),
                    param("Batch"),
                    param("LastEventId"),
                ],
                responses={
                    "200": sse("The chat's running answer, or its just-finished one.", "SseEvent"),
                    "204": no_content("Nothing to resume."),
                    "400": error(
                        "No chatId, a bad `after` / Last-Event-ID, or a bad `batch`",
                        "bad_request",
                        "invalid_after",
                        "invalid_parameter",
                    ),
                    "404": error("No such chat for this user", "chat_not_found"),
                    **common("Unauthorized", "InternalError", "Unavailable"),
                },
            ),
        },
        "/api/v1/chats": {
            "get": operation(
                "listChats",
                "chats",
                "The caller's chats, most recently updated first",
                parameters=[param("Limit"), param("Query")],
                responses={
                    "200": ok(
                        f"At most {settings.list_page_size} chats (or `limit`); with `q`, "
                        "those whose title contains it.",
                        schema("ChatList"),
                    ),
                    "400": error(
                        "`limit` is not a whole number in range, or `q` is too long",
                        "bad_request",
                    ),
                    **common("Unauthorized", "InternalError", "Unavailable"),
                },
            )
        },
        "/api/v1/chats/{chat_id}": {
            "parameters": [param("ChatId")],
            "get": operation(
                "getChat",
                "chats",
                "One chat with its messages",
                responses={
                    "200": ok("The chat.", schema("ChatDetail")),
                    "404": error("No such chat for this user", "chat_not_found", "not_found"),
                    **common("Unauthorized", "InternalError", "Unavailable"),
                },
            ),
            "delete": operation(
                "deleteChat",
                "chats",
                "Delete a chat, its answers and their logs (a running answer stops)",
                description=WRITE_NOTE,
                responses={
                    "204": no_content("Deleted."),
                    "404": error("No such chat for this user", "chat_not_found", "not_found"),
                    **common("Unauthorized", "ForbiddenOrigin", "InternalError", "Unavailable"),
                },
            ),
            "patch": operation(
                "renameChat",
                "chats",
                "Rename a chat",
                description=f"The chat's `updatedAt` does not change. {WRITE_NOTE}",
                requestBody={"required": True, "content": json_body(schema("RenameChat"))},
                responses={
                    "200": ok("The renamed chat.", schema("ChatSummary")),
                    "400": error("The body is not a JSON object", "invalid_json"),
                    "404": error("No such chat for this user", "chat_not_found", "not_found"),
                    "413": ref("responses", "RequestTooLarge"),
                    "422": error("The title is not acceptable", "invalid_title"),
                    **common("Unauthorized", "ForbiddenOrigin", "InternalError", "Unavailable"),
                },
            ),
        },
        "/api/v1/chats/{chat_id}/regenerate": {
            "parameters": [param("ChatId")],
            "post": operation(
                "regenerateAnswer",
                "chats",
                "Replace the chat's last answer with a new one to the same message",
                description="The last answer must have ended (done, failed or cancelled). It "
                "is deleted (message, stream and log) and a new answer is generated for the "
                f"same user message, admitted like a post. {WRITE_NOTE}",
                parameters=TURN_PARAMETERS,
                requestBody={"required": False, "content": json_body(schema("Regenerate"))},
                responses={
                    "200": turn_events(STREAMED_NOTE),
                    "202": accepted("Accepted: the old answer is gone and the new one is queued."),
                    "400": error(
                        "The body or a header is not acceptable",
                        "invalid_json",
                        "bad_request",
                        "model_not_allowed",
                        "invalid_parameter",
                        "invalid_after",
                    ),
                    "404": error("No such chat for this user", "chat_not_found", "not_found"),
                    "409": error(
                        "The chat has no answer yet, its last answer is still queued or "
                        "running, another of its answers is, or a request with the same "
                        "Idempotency-Key is still being answered",
                        "illegal_transition",
                        "chat_busy",
                        "idempotency_in_progress",
                    ),
                    "413": ref("responses", "RequestTooLarge"),
                    "422": error(
                        "The Idempotency-Key was used with another body", "idempotency_key_reused"
                    ),
                    "503": error(
                        "The task queue, Redis or the database is unreachable",
                        "broker_unavailable",
                        "service_unavailable",
                    ),
                    **common("Unauthorized", "ForbiddenOrigin", "TooManyRequests", "InternalError"),
                },
            ),
        },
        "/api/v1/models": {
            "get": operation(
                "listModels",
                "chats",
                "The models a post may name (RELAY_MODEL, RELAY_ALLOWED_MODELS)",
                responses={
                    "200": ok("The default model and every allowed one.", schema("ModelList")),
                    **common("Unauthorized", "InternalError", "Unavailable"),
                },
            )
        },
        "/api/v1/chats/{chat_id}/ws": {
            "parameters": [param("ChatId")],
            "get": websocket(
                "chatSocket", "The chat's latest stream over a WebSocket (4404: no stream yet)"
            ),
        },
    }


def stream_paths() -> JSON:
    return {
        "/api/v1/streams/{stream_id}": {
            "parameters": [param("StreamId")],
            "get": operation(
                "getStream",
                "streams",
                "A stream's status, last seq and error",
                responses={
                    "200": ok("The stream.", schema("Stream")),
                    "404": error("No such stream for this user", "stream_not_found", "not_found"),
                    **common("Unauthorized", "InternalError", "Unavailable"),
                },
            ),
        },
        "/api/v1/streams/{stream_id}/cancel": {
            "parameters": [param("StreamId")],
            "post": operation(
                "cancelStream",
                "streams",
                "Cancel a generation (the partial text is kept)",
                description=f"No request body. {WRITE_NOTE}",
                responses={
                    "202": ok(
                        "`cancelling`: the worker stops at its next chunk; `cancelled`: ended "
                        "here (nobody was writing it), or already cancelled.",
                        schema("CancelAccepted"),
                    ),
                    "404": error("No such stream for this user", "stream_not_found", "not_found"),
                    "409": error("The stream already ended with done or error", "stream_finished"),
                    **common("Unauthorized", "ForbiddenOrigin", "InternalError", "Unavailable"),
                },
            ),
        },
        "/api/v1/streams/{stream_id}/retry": {
            "parameters": [param("StreamId")],
            "post": operation(
                "retryStream",
                "streams",
                "Continue a failed or cancelled answer on the same stream",
                description="A `resumed` event, then the rest of the answer (as the admin "
                f"CLI's `streams retry`). No request body. Admitted like a post. {WRITE_NOTE}",
                responses={
                    "202": ok("The new attempt is queued.", schema("RetryAccepted")),
                    "404": error("No such stream for this user", "stream_not_found", "not_found"),
                    "409": error(
                        "The stream did not end failed or cancelled, or its chat has another "
                        "answer in progress",
                        "illegal_transition",
                        "chat_busy",
                    ),
                    "503": error(
                        "The task queue, Redis or the database is unreachable",
                        "broker_unavailable",
                        "service_unavailable",
                    ),
                    **common("Unauthorized", "ForbiddenOrigin", "TooManyRequests", "InternalError"),
                },
            ),
        },
        "/api/v1/streams/{stream_id}/events": {
            "parameters": [param("StreamId")],
            "get": operation(
                "streamEvents",
                "streams",
                "The stream's events as Server-Sent Events",
                description="The events with seq > `after` (or Last-Event-ID), live to the "
                "terminal event that nothing follows; then the response ends.",
                parameters=[param("After"), param("Batch"), param("LastEventId")],
                responses={
                    "200": sse(
                        "The events (`retry: 1000`, then `id`/`event`/`data` blocks).", "SseEvent"
                    ),
                    "204": no_content("The stream has ended and the client has seen its end."),
                    "400": error(
                        "A bad `after` / Last-Event-ID or `batch`",
                        "invalid_after",
                        "invalid_parameter",
                    ),
                    "404": error("No such stream for this user", "stream_not_found", "not_found"),
                    **common("Unauthorized", "InternalError", "Unavailable"),
                },
            ),
        },
        "/api/v1/streams/{stream_id}/ws": {
            "parameters": [param("StreamId")],
            "get": websocket("streamSocket", "The stream's events over a WebSocket"),
        },
    }


def feed_paths() -> JSON:
    """The user's live feed (docs/api.md#live-feed)."""
    after = {
        "name": "after",
        "in": "query",
        "description": "The last feed seq the client has applied; absent: start now, with a "
        "`reset` event. Malformed: 400 `invalid_after`.",
        "schema": {"type": "integer", "minimum": 0},
    }
    kinds = ["reset", "chat.created", "chat.renamed", "chat.deleted"]
    kinds += ["answer.queued", "answer.waiting", "answer.started", "answer.finished"]
    event = {
        "type": "object",
        "required": ["seq", "type"],
        "properties": {
            "seq": {"type": "integer", "minimum": 0},
            "type": {"enum": kinds},
            "chatId": STRING,
            "streamId": STRING,
            "messageId": STRING,
            "status": {"enum": ["done", "cancelled", "failed"]},
            "reason": {"enum": ["abandoned"]},
            "title": STRING,
            "position": {"type": "integer", "minimum": 1},
            "etaSeconds": {"type": "integer", "minimum": 0},
            "at": {"type": "string", "format": "date-time"},
        },
    }
    block = obj(
        ["id", "data"],
        {
            "id": {"type": "string", "pattern": "^[0-9]+$", "description": "The seq."},
            "data": {
                "type": "string",
                "contentMediaType": "application/json",
                "contentSchema": event,
            },
            "retry": {"type": "integer"},
        },
        description="One SSE event block of the feed (no `event:` line); the body starts "
        "with `retry: 1000` and may carry `: keepalive` comments.",
    )
    socket = websocket("feedSocket", "The user's live feed over a WebSocket")
    socket["description"] = (
        "A WebSocket handshake; then one text message per feed event, live until the client "
        'leaves. Client messages: `{"type": "ping"}`. A bad `after` or Origin after the '
        "handshake: close 4400, 4403; the process going away: 1001."
    )
    socket["parameters"] = [after, *socket["parameters"][2:]]
    return {
        "/api/v1/feed/events": {
            "get": operation(
                "feedEvents",
                "streams",
                "The user's live feed as Server-Sent Events",
                description="The feed's events with seq > `after` (or Last-Event-ID), then "
                "live ones, until the client leaves.",
                parameters=[after, param("LastEventId")],
                responses={
                    "200": {
                        "description": "The events (`retry: 1000`, then `id`/`data` blocks).",
                        "headers": {name: ref("headers", name) for name in SSE_HEADERS},
                        "content": {"text/event-stream": {"schema": block}},
                    },
                    "400": error("A bad `after` / Last-Event-ID", "invalid_after"),
                    **common("Unauthorized", "InternalError", "Unavailable"),
                },
            ),
        },
        "/api/v1/feed/ws": {"get": socket},
    }


def websocket(op_id: str, summary: str) -> JSON:
    """A WebSocket endpoint: a GET with the upgrade headers (RFC 6455)."""

    def header(name: str, value_schema: JSON) -> JSON:
        return {"name": name, "in": "header", "required": True, "schema": value_schema}

    return operation(
        op_id,
        "websocket",
        summary,
        description="A WebSocket handshake; then one text message per event (the `Event` "
        "schema) and the close codes of docs/api.md#websocket. Client messages: "
        '`{"type": "cancel"}`, `{"type": "ping"}`. Problems after the handshake (bad '
        "`after`, unknown stream, Origin) are close codes (4400, 4404, 4403, ...).",
        parameters=[
            param("After"),
            param("Batch"),
            header("Upgrade", {"const": "websocket"}),
            header("Connection", {"type": "string", "description": "Contains `Upgrade`."}),
            header("Sec-WebSocket-Key", STRING),
            header("Sec-WebSocket-Version", {"const": "13"}),
        ],
        responses={
            "101": {
                "description": "Switching Protocols: the socket carries the stream's events.",
                "headers": {
                    "Upgrade": {"schema": {"const": "websocket"}},
                    "Sec-WebSocket-Accept": {"schema": STRING},
                },
            },
            "400": error(
                "A plain GET (no WebSocket upgrade), or a malformed handshake", "bad_request"
            ),
            "404": error("A path id that no id can be", "not_found"),
            **common("InternalError"),
        },
        **{"x-websocket": True},
    )


def aisdk_paths() -> JSON:
    ui_stream = (
        "The answer from its start, live to its end, as the AI SDK's UI message stream "
        "(docs/ai-sdk.md#event-mapping); every response is the whole answer (a replay)."
    )
    ui_headers = (*SSE_HEADERS, "X-Vercel-AI-UI-Message-Stream")
    return {
        "/api/v1/ai-sdk/chat": {
            "post": operation(
                "aiSdkSend",
                "ai-sdk",
                "Send a user turn (AI SDK DefaultChatTransport)",
                description=f"Stored and queued as POST /api/v1/chat does. {WRITE_NOTE} With "
                "an Idempotency-Key, a repeat (same key, same body) starts nothing and gets the "
                "same answer again, replayed from its start (docs/ai-sdk.md).",
                parameters=[param("IdempotencyKey")],
                requestBody={"required": True, "content": json_body(schema("AiSdkSend"))},
                responses={
                    "200": sse(ui_stream, "UIStreamEvent", (*ui_headers, "Idempotent-Replayed")),
                    "400": error(
                        "The body or a header is not acceptable",
                        "bad_request",
                        "invalid_json",
                        "invalid_message",
                        "unsupported_trigger",
                        "model_not_allowed",
                        "invalid_parameter",
                    ),
                    "404": error(
                        "A repeat (same Idempotency-Key) of a send whose chat was deleted since",
                        "stream_not_found",
                    ),
                    **send_errors(),
                    **common("Unauthorized", "ForbiddenOrigin", "TooManyRequests", "InternalError"),
                },
            )
        },
        "/api/v1/ai-sdk/chat/{chat}/stream": {
            "parameters": [param("ClientChatId")],
            "get": operation(
                "aiSdkResume",
                "ai-sdk",
                "Resume the chat's latest answer",
                responses={
                    "200": sse(ui_stream, "UIStreamEvent", ui_headers),
                    "204": no_content(
                        "Nothing to resume (also an unknown chat, or another user's)."
                    ),
                    "404": error("A path that names no route", "not_found"),
                    **common("Unauthorized", "InternalError", "Unavailable"),
                },
            ),
        },
        "/api/v1/ai-sdk/chat/{chat}/stop": {
            "parameters": [param("ClientChatId")],
            "post": operation(
                "aiSdkStop",
                "ai-sdk",
                "Cancel the chat's running answer",
                description="Answers once the answer ended, or after 2 s (`cancelling`). "
                f"Nothing to stop, an unknown or another user's chat: `none`. {WRITE_NOTE}",
                requestBody={"required": False, "content": json_body(schema("AiSdkStop"))},
                responses={
                    "200": ok("What happened.", schema("StopResult")),
                    "404": error("A path that names no route", "not_found"),
                    **common(
                        "Unauthorized",
                        "ForbiddenOrigin",
                        "RequestTooLarge",
                        "InternalError",
                        "Unavailable",
                    ),
                },
            ),
        },
        "/api/v1/ai-sdk/chat/{chat}/messages": {
            "parameters": [param("ClientChatId")],
            "get": operation(
                "aiSdkMessages",
                "ai-sdk",
                "The chat as UI messages (hydration); [] for a chat that is not this user's",
                responses={
                    "200": ok("The messages.", {"type": "array", "items": schema("UIMessageOut")}),
                    "404": error("A path that names no route", "not_found"),
                    **common("Unauthorized", "InternalError", "Unavailable"),
                },
            ),
        },
    }


def service_paths() -> JSON:
    return {
        "/": {
            "get": operation(
                "page",
                "service",
                "The chat page (docs/client.md)",
                security=PUBLIC,
                responses={
                    "200": {
                        "description": "The page.",
                        "content": {"text/html": {"schema": STRING}},
                    },
                    "304": no_content("Not modified (a conditional request)."),
                    **common("InternalError"),
                },
            )
        },
        "/healthz": {
            "get": operation(
                "healthz",
                "service",
                "Liveness, without touching Redis or SQL",
                security=PUBLIC,
                responses={"200": ok("Alive.", schema("Health")), **common("InternalError")},
            )
        },
        "/readyz": {
            "get": operation(
                "readyz",
                "service",
                "Readiness: pings Redis and runs SELECT 1",
                security=PUBLIC,
                responses={
                    "200": ok("Ready.", schema("Ready")),
                    "503": ok("A check failed.", schema("Ready")),
                    **common("InternalError"),
                },
            )
        },
        "/metrics": {
            "get": operation(
                "metrics",
                "service",
                "Prometheus metrics of this web server",
                security=[{}, {"metricsToken": []}],
                description="With RELAY_METRICS_TOKEN set, only with `Authorization: Bearer <it>`.",
                responses={
                    "200": {
                        "description": "Prometheus text format (docs/operations.md#metrics).",
                        "content": {"text/plain": {"schema": STRING}},
                    },
                    "401": error("RELAY_METRICS_TOKEN is set and was not sent", "unauthorized"),
                    **common("InternalError", "Unavailable"),
                },
            )
        },
        PATH: {
            "get": operation(
                "openapi",
                "service",
                "This document",
                security=PUBLIC,
                responses={
                    "200": ok("OpenAPI 3.1.", {"type": "object"}),
                    **common("InternalError"),
                },
            )
        },
    }


def with_server_limits(paths: JSON) -> JSON:
    """Every operation can meet gunicorn's limits on the request line and headers."""
    for path_item in paths.values():
        for key, op in path_item.items():
            if key != "parameters":
                op["responses"].update(common("UriTooLong", "HeadersTooLarge"))
    return paths


def document(settings: Settings) -> JSON:
    """The whole OpenAPI document for a server running with ``settings``."""
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "relay",
            "version": relay_version(),
            "summary": "Resumable LLM chat streams",
            "description": "The HTTP API of relay (docs/api.md is the prose reference; "
            "docs/ai-sdk.md the AI SDK endpoints). HEAD and OPTIONS, which Flask answers for "
            "every route, are not listed. Any method a path does not list is 405 "
            "`method_not_allowed`; any other path is 404 `not_found`.",
        },
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "tags": [
            {"name": "chats", "description": "Posting and reading chats"},
            {"name": "streams", "description": "Answers as streams of events"},
            {"name": "websocket", "description": "Attaching over a WebSocket"},
            {"name": "ai-sdk", "description": "The Vercel AI SDK's chat protocol"},
            {"name": "service", "description": "The page, health, metrics, this document"},
        ],
        "security": [{}, {"guestSession": []}, {"bearerToken": []}],
        "paths": with_server_limits(
            {
                **chat_paths(settings),
                **stream_paths(),
                **feed_paths(),
                **aisdk_paths(),
                **service_paths(),
            }
        ),
        "components": {
            "schemas": schemas(settings),
            "parameters": parameters(settings),
            "headers": headers(),
            "responses": responses(),
            "securitySchemes": security_schemes(),
        },
    }


def init_app(app: Flask, settings: Settings) -> None:
    built = document(settings)

    @app.get(PATH)
    def openapi() -> Response:
        return jsonify(built)
