"""The Vercel AI SDK's chat protocol (``ai`` 7.x ``DefaultChatTransport``) over relay's streams.

An unmodified ``useChat({resume: true})`` front end configured with
``api: "/api/v1/ai-sdk/chat"`` posts its chat here, reconnects with
``GET {api}/<chatId>/stream`` and stops with ``POST {api}/<chatId>/stop``
(docs/ai-sdk.md). The answer is the same event sequence relay serves over SSE, read by the
same follower (catch-up from the log or SQL, then the hub), in another encoding: the SDK's
UI message stream. The SDK sends no cursor when it reconnects and rebuilds the message from
whatever the reconnect sends, so every response is the whole answer from seq 1, always
opened by a ``start`` part that carries relay's message id.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from flask import Blueprint, Response, jsonify, request
from sqlalchemy import select

from models.events import CANCELLED, CHUNK, DONE, ERROR, TERMINAL_TYPES
from models.exceptions import BadRequest, InvalidMessage, MessageTooLarge
from models.tables import (
    ACTIVE_STREAM_STATUSES,
    TERMINAL_STREAM_STATUSES,
    Chat,
    Message,
    Stream,
    utcnow,
)
from web import idempotency, ratelimit
from web.api import requested_detach, requested_model
from web.attach import Followed
from web.auth import current_user_id, ensure_user
from web.chats import (
    StreamRef,
    Turn,
    active_stream,
    add_client_turn,
    cancel_stream,
    check_not_busy,
    client_chat,
    commit_turn,
    enqueue,
    get_stream,
    latest_stream,
)
from web.errors import UNAVAILABLE_ERRORS
from web.frames import Batch, Notice
from web.inputs import is_id, json_object, storable
from web.instruments import ATTACHES, VIEWERS
from web.runtime import Runtime, get_db, get_runtime
from web.streaming import SSE_KEEPALIVE_S, follower, sse_frames

log = logging.getLogger("relay.web")
bp = Blueprint("aisdk", __name__, url_prefix="/api/v1/ai-sdk/chat")

TRANSPORT = "ai-sdk"  # the metrics' transport label
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
    "x-vercel-ai-ui-message-stream": "v1",
}
TEXT_ID = "text-1"  # one text part per answer, the same id on every response
DONE_LINE = "data: [DONE]\n\n"
# The SDK's default body carries the whole UI history on every turn: allow it this many
# times RELAY_MAX_REQUEST_BYTES (4 MiB by default) on the send endpoint only.
SEND_BODY_FACTOR = 16
# How long a stop waits for the stream to end, so the next post is not refused as busy.
STOP_WAIT_S = 2.0
STOP_POLL_S = 0.05
LOG_FINAL_STATUSES = ("done", "cancelled", "failed")  # the log state's, set by a terminal event
# Provider finish reasons as relay stores them -> the SDK's FinishReason.
FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "content_filter": "content-filter",
    "tool_calls": "tool-calls",
}


class UnsupportedTrigger(BadRequest):
    """Regenerating an answer or editing a user message: not offered (docs/ai-sdk.md)."""

    code = "unsupported_trigger"


class Abort(ConnectionResetError):
    """Raised from a response body to end the connection without ending the body: the SDK
    takes a clean end without ``finish`` as the final answer, and a cut one as a network
    error it can resume from. gunicorn drops the connection and logs it at debug level."""

    def __init__(self, why: str) -> None:
        super().__init__(errno.ECONNRESET, why)


# -- requests ---------------------------------------------------------------------------------


def client_id_of(body: dict[str, Any]) -> str:
    """The client's chat id: 1-64 characters of ``[A-Za-z0-9_-]``."""
    value = body.get("id")
    if not isinstance(value, str) or not is_id(value):
        raise BadRequest('"id" must be the chat id: 1-64 characters of A-Z a-z 0-9 _ -')
    return value


def check_trigger(body: dict[str, Any]) -> None:
    """Only a new user message is supported: regenerate and edits are refused (400)."""
    trigger = body.get("trigger")
    if trigger not in (None, "submit-message"):
        raise UnsupportedTrigger(f"trigger {trigger!r} is not supported; only submit-message")
    if body.get("messageId") is not None:
        raise UnsupportedTrigger("editing a message (messageId) is not supported")


def new_user_message(body: dict[str, Any]) -> dict[str, Any]:
    """The turn to answer: ``message`` (the body of the SDK's resume docs), else the last of
    ``messages`` (the transport's default body). The rest of the history is ignored: relay's
    SQL history is the conversation."""
    message = body.get("message")
    if message is None:
        history = body.get("messages")
        message = history[-1] if isinstance(history, list) and history else None
    if not isinstance(message, dict):
        raise InvalidMessage('the body needs "message" or a non-empty "messages" list')
    if message.get("role", "user") != "user":
        raise InvalidMessage("the new message must be the user's (role user)")
    return message


def message_text(message: dict[str, Any], max_chars: int) -> str:
    """The text of a UI message's ``text`` parts, joined with newlines; other parts ignored."""
    parts = message.get("parts")
    texts = [
        item["text"]
        for item in (parts if isinstance(parts, list) else [])
        if isinstance(item, dict)
        and item.get("type") == "text"
        and isinstance(item.get("text"), str)
    ]
    text = "\n".join(texts)
    if not text.strip():
        raise InvalidMessage("the message has no text (parts of type text)")
    if len(text) > max_chars:
        raise MessageTooLarge(f"the message is {len(text)} characters; the limit is {max_chars}")
    return storable(text, "the message text", InvalidMessage)


def optional_object() -> dict[str, Any]:
    """A body that may be absent or anything: its JSON object, else nothing."""
    try:
        data = request.get_json(silent=True, force=True)
    except RecursionError:  # nested deeper than the parser's limit: not an object we read
        return {}
    return data if isinstance(data, dict) else {}


# -- the UI message stream --------------------------------------------------------------------


# A queued answer's place in line ({"position": 2, "etaSeconds": 30}): a transient data part,
# which the SDK hands to onData and keeps out of the message.
QUEUED_PART = "data-queued"


def part(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'), ensure_ascii=False)}\n\n"


def finish_reason(stored: str | None) -> str:
    """The SDK's finish reason for the one relay stored (none, as the demo: a plain stop)."""
    if stored is None:
        return "stop"
    return FINISH_REASONS.get(stored, "other")


class UIEncoder:
    """relay's events of one answer as UI message stream parts.

    Chunks become deltas of one text part (a batch's run of chunks, one delta). A terminal
    event is held until it is known to be the last: in a replay of a retried answer, an
    earlier terminal event and the ``resumed`` marker after it are skipped, so the text runs
    on in the same part."""

    def __init__(self, message_id: str) -> None:
        self.message_id = message_id
        self.opened = False
        self.terminal: tuple[str, str] | None = None  # (type, stored data)

    def start(self) -> str:
        return part({"type": "start", "messageId": self.message_id})

    def encode(self, batch: Batch | Notice) -> str:
        if isinstance(batch, Notice):  # where a queued answer stands: shown, never stored
            place = {k: v for k, v in batch.fields.items() if k != "type"}
            return part({"type": QUEUED_PART, "data": place, "transient": True})
        out: list[str] = []
        run: list[str] = []
        for kind, data in zip(batch.types, batch.datas, strict=True):
            if kind == CHUNK:
                run.append(data)
                continue
            out.append(self._text(run))
            run = []
            self.terminal = (kind, data) if kind in TERMINAL_TYPES else None
        out.append(self._text(run))
        return "".join(out)

    def _text(self, run: list[str]) -> str:
        if not run:
            return ""
        self.terminal = None  # text after a terminal event: it was not the last one
        out = "" if self.opened else part({"type": "text-start", "id": TEXT_ID})
        self.opened = True
        delta = "".join(run)
        if delta:
            out += part({"type": "text-delta", "id": TEXT_ID, "delta": delta})
        return out

    @property
    def ended(self) -> bool:
        return self.terminal is not None

    def end(self, stored_finish_reason: str | None) -> str:
        """The closing parts for the final terminal event, then ``[DONE]``."""
        assert self.terminal is not None
        kind, data = self.terminal
        text_end = part({"type": "text-end", "id": TEXT_ID}) if self.opened else ""
        if kind == DONE:
            reason = finish_reason(stored_finish_reason)
            return text_end + part({"type": "finish", "finishReason": reason}) + DONE_LINE
        if kind == CANCELLED:
            # "cancelled", or why when not at a person's request ("abandoned")
            return text_end + part({"type": "abort", "reason": data or "cancelled"}) + DONE_LINE
        assert kind == ERROR
        error = json.loads(data) if data else {}
        text = f"{error.get('code', 'failed')}: {error.get('message', '')}"
        return part({"type": "error", "errorText": text}) + DONE_LINE


def ui_response(rt: Runtime, stream: StreamRef, message_id: str) -> Response:
    """The answer of ``stream`` from seq 1, live to its end, as a UI message stream."""
    wake = threading.Event()
    finished = stream.status in TERMINAL_STREAM_STATUSES
    events = follower(rt, stream.id, wake).follow(0, finished)
    ATTACHES.labels(TRANSPORT, "new").inc()
    log.info("stream=%s attach transport=%s after=0", stream.id, TRANSPORT)
    idle_s = min(rt.settings.idle_tick_s, SSE_KEEPALIVE_S)
    body = _ui_body(rt, UIEncoder(message_id), events, wake, idle_s)
    return Response(body, status=200, mimetype="text/event-stream", headers=HEADERS)


def _ui_body(
    rt: Runtime,
    encoder: UIEncoder,
    events: Followed,
    wake: threading.Event,
    idle_s: float,
) -> Iterator[str]:
    VIEWERS.labels(TRANSPORT).inc()
    try:
        yield encoder.start()
        if (yield from sse_frames(events, encoder.encode, wake, idle_s)):
            raise Abort("server restarting")  # the SDK reconnects: to another process
        if not encoder.ended:  # a replay from SQL that a retry reopened meanwhile
            raise Abort("the answer goes on; reconnect")
        last = encoder.end(_stored_finish_reason(rt, encoder))
    except UNAVAILABLE_ERRORS as exc:
        log.warning("ai-sdk stream cut: backend unavailable (%s)", type(exc).__name__)
        raise Abort("backend unavailable") from exc
    finally:
        events.close()
        VIEWERS.labels(TRANSPORT).dec()
    yield last


def _stored_finish_reason(rt: Runtime, encoder: UIEncoder) -> str | None:
    if encoder.terminal is None or encoder.terminal[0] != DONE:
        return None
    with rt.sessions() as db:
        return db.scalar(select(Message.finish_reason).where(Message.id == encoder.message_id))


# -- endpoints --------------------------------------------------------------------------------


@bp.post("")
def send() -> Response:
    """A new user turn: commit and enqueue it as POST /api/v1/chat does, then answer with
    its stream from the beginning. With an Idempotency-Key, a repeat of the same request
    (same key, same body, same user, within 24 h) starts nothing: it gets the first
    request's answer replayed from its start, as a resume does (docs/ai-sdk.md)."""
    rt = get_runtime()
    db = get_db()
    request.max_content_length = rt.settings.max_request_bytes * SEND_BODY_FACTOR
    body = json_object()
    client_id = client_id_of(body)
    check_trigger(body)
    text = message_text(new_user_message(body), rt.settings.max_message_chars)
    model = requested_model(body, rt.settings)
    detach_after_s = requested_detach(body, rt.settings)
    interrupt = body.get("interrupt") is True
    key = idempotency.requested_key()
    uid = current_user_id(db)
    claimed = idempotency.claim(rt.log.redis, uid, key) if key is not None else None
    if claimed is not None and not isinstance(claimed, idempotency.Claim):
        return _replayed(rt, uid, claimed[0])
    try:
        turn = _new_turn(rt, uid, client_id, text, model, interrupt, detach_after_s)
    except BaseException:
        if claimed is not None:
            claimed.release()  # nothing was started: let the retry run
        raise
    if claimed is not None:
        claimed.store({"streamId": turn.stream_id, "messageId": turn.message_id}, 200)
    return ui_response(rt, StreamRef(turn.stream_id, "queued", 0), turn.message_id)


def _new_turn(
    rt: Runtime,
    uid: str,
    client_id: str,
    text: str,
    model: str,
    interrupt: bool,
    detach_after_s: int | None,
) -> Turn:
    db = get_db()
    with ratelimit.admitted(rt, db, uid):  # before any write: see web/api.py post_chat
        found = client_chat(db, uid, client_id)
        check_not_busy(rt, db, found.id if found else None, interrupt)
        ensure_user(db, uid)
        turn = add_client_turn(db, uid, client_id, found, text, model, detach_after_s)
        commit_turn(db, turn)  # the rows exist before any worker can look for them
    enqueue(rt, db, uid, turn)
    return turn


def _replayed(rt: Runtime, uid: str, first: dict[str, Any]) -> Response:
    """The answer the first request with this Idempotency-Key started, from its start (404
    once its chat has been deleted)."""
    db = get_db()
    stream = get_stream(db, uid, str(first["streamId"]))
    response = ui_response(rt, StreamRef.of(stream), stream.message_id)
    response.headers[idempotency.REPLAYED_HEADER] = "true"
    return response


# The path names the chat ``chat``, not ``*_id``: web.inputs answers an impossible ``*_id``
# 404, and the SDK needs 204 for any chat it cannot resume (404 is an error it shows).
@bp.get("/<chat>/stream")
def resume(chat: str) -> Response:
    """The chat's latest answer, replayed from seq 1: while it runs, and for
    RELAY_RESUME_FALLBACK_S after it ended; else 204 (so is a chat that is not this user's)."""
    rt = get_runtime()
    stream = _resumable(rt, chat)
    if stream is None:
        return Response(status=204)
    return ui_response(rt, StreamRef.of(stream), stream.message_id)


def _resumable(rt: Runtime, client_id: str) -> Stream | None:
    db = get_db()
    found = _own_chat(client_id)
    stream = latest_stream(db, found.id) if found is not None else None
    if stream is None or stream.status in ACTIVE_STREAM_STATUSES:
        return stream
    recent = utcnow() - timedelta(seconds=rt.settings.resume_fallback_s)
    return stream if stream.finished_at is not None and stream.finished_at >= recent else None


@bp.post("/<chat>/stop")
def stop(chat: str) -> Response:
    """Cancel the chat's running answer (``chat.stop()`` only closes the client's fetch).
    Idempotent: nothing running, an unknown chat or another user's all answer ``none``."""
    rt = get_runtime()
    db = get_db()
    wanted = optional_object().get("messageId")
    found = _own_chat(chat)
    stream = active_stream(db, found.id) if found is not None else None
    if stream is None or wanted not in (None, stream.message_id):
        return jsonify(status="none", messageId=None)  # nothing, or an older answer's stop
    cancel_stream(rt, db, stream)
    status = _wait_ended(rt, stream.id)
    stopped = {"cancelled": "cancelled", "queued": "cancelling", "running": "cancelling"}
    return jsonify(status=stopped.get(status, "none"), messageId=stream.message_id)


def _wait_ended(rt: Runtime, stream_id: str) -> str:
    """The stream's SQL status once it has ended, or after STOP_WAIT_S: a post right after
    the stop is then not refused as busy while the worker acts on the cancel. Ended means
    the log has its terminal event too (the worker stores the end in SQL first): the page's
    open response then has the answer's end on its way before ``chat.stop()`` closes it."""
    deadline = time.monotonic() + STOP_WAIT_S
    while True:
        with rt.sessions() as db:
            status = str(db.scalar(select(Stream.status).where(Stream.id == stream_id)))
        if time.monotonic() >= deadline:
            return status
        if status in TERMINAL_STREAM_STATUSES and _log_ended(rt, stream_id):
            return status
        time.sleep(STOP_POLL_S)


def _log_ended(rt: Runtime, stream_id: str) -> bool:
    """Whether the log holds the stream's terminal event (or is gone: SQL has it all)."""
    status = rt.log.state(stream_id).status
    return status is None or status in LOG_FINAL_STATUSES


@bp.get("/<chat>/messages")
def messages(chat: str) -> Response:
    """The chat as UI messages, to seed ``useChat({messages})`` on a page load; ``[]`` for
    a chat that is not this user's. A streaming answer comes with its checkpointed text:
    the resume replay then rebuilds it by id."""
    db = get_db()
    found = _own_chat(chat)
    if found is None:
        return jsonify([])
    rows = db.scalars(select(Message).where(Message.chat_id == found.id).order_by(Message.position))
    return jsonify([ui_message(m) for m in rows])


def _own_chat(client_id: str) -> Chat | None:
    """The caller's chat of this client id; None for an id no chat can have."""
    db = get_db()
    return client_chat(db, current_user_id(db), client_id) if is_id(client_id) else None


def ui_message(message: Message) -> dict[str, Any]:
    """One stored message in the SDK's UIMessage shape (one text part, or none yet)."""
    streaming = message.status in ("pending", "streaming")
    parts = (
        [{"type": "text", "text": message.content, "state": "streaming" if streaming else "done"}]
        if message.content or message.role == "user"
        else []
    )
    return {"id": message.id, "role": message.role, "parts": parts}
