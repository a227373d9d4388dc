"""The HTTP API under /api/v1: post a message, list chats, stream status, cancel, SSE."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request
from sqlalchemy import select
from sqlalchemy.orm import Session

from models import feed, lifecycle
from models.exceptions import (
    BadRequest,
    ChatNotFound,
    InvalidAfter,
    InvalidMessage,
    InvalidParameter,
    MessageTooLarge,
    ModelNotAllowed,
    StreamFinished,
)
from models.settings import DETACH_POLICIES, MAX_DETACH_S, MIN_DETACH_S, Settings
from models.tables import ACTIVE_STREAM_STATUSES, Message, utcnow
from web import idempotency, ratelimit
from web.auth import current_user_id, ensure_user
from web.chats import (
    StreamRef,
    Turn,
    add_turn,
    cancel_stream,
    chat_detail_json,
    chat_json,
    check_not_busy,
    check_regenerable,
    check_retryable,
    commit_turn,
    enqueue,
    get_chat,
    get_stream,
    latest_stream,
    list_chats_of,
    rename_chat,
    replace_answer,
    retry_stream,
    search_query,
    stream_json,
    stream_ref,
    title_from,
)
from web.inputs import check_id, json_object, storable
from web.runtime import Runtime, get_db, get_runtime
from web.streaming import parse_after, parse_batch, snapshot_response, sse_response

bp = Blueprint("api", __name__, url_prefix="/api/v1")
JSON = "application/json"
EVENT_STREAM = "text/event-stream"


def message_text(body: dict[str, Any], max_chars: int) -> str:
    text = body.get("message")
    if not isinstance(text, str) or not text.strip():
        raise InvalidMessage('"message" must be a non-empty string')
    if len(text) > max_chars:
        raise MessageTooLarge(f'"message" is {len(text)} characters; the limit is {max_chars}')
    return storable(text, '"message"', InvalidMessage)


def optional_id(body: dict[str, Any], name: str) -> str | None:
    """An optional id field: absent, or a string; one that cannot be an id names nothing."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise BadRequest(f'"{name}" must be a string id when given')
    return check_id(value, ChatNotFound)


def requested_model(body: dict[str, Any], settings: Settings) -> str:
    """The model to answer with: the default, or an allowed one named in the request."""
    model = body.get("model")
    if model is None:
        return settings.model
    if not isinstance(model, str) or not settings.allows_model(model):
        allowed = ", ".join(sorted({settings.model, *settings.allowed_models}))
        raise ModelNotAllowed(f"model {model!r} is not available here; allowed: {allowed}")
    return model


def requested_detach(body: dict[str, Any], settings: Settings) -> int | None:
    """The answer's detach policy as seconds (None: continue to the end): the deployment's,
    or the request's ``onDetach``: ``"continue"``, ``"cancel-after"`` (the deployment's
    seconds) or ``{"policy": "cancel-after", "seconds": N}``."""
    asked = body.get("onDetach")
    if asked is None:
        return settings.detach_after_s()
    seconds: Any = settings.on_detach_seconds
    if isinstance(asked, dict):
        policy, seconds = asked.get("policy"), asked.get("seconds", seconds)
        unknown = set(asked) - {"policy", "seconds"}
        if unknown:
            raise InvalidParameter(f"onDetach has unknown fields: {', '.join(sorted(unknown))}")
    else:
        policy = asked
    if policy not in DETACH_POLICIES:
        raise InvalidParameter(
            'onDetach must be "continue", "cancel-after" or '
            '{"policy": "cancel-after", "seconds": N}'
        )
    if policy == "continue":
        return None
    if type(seconds) is not int or not MIN_DETACH_S <= seconds <= MAX_DETACH_S:
        raise InvalidParameter(
            f"onDetach seconds must be an integer from {MIN_DETACH_S} to {MAX_DETACH_S}"
        )
    return seconds


def last_event_id() -> int:
    """Where an SSE client resumes: Last-Event-ID (sent on reconnect) wins over ?after."""
    return parse_after(request.headers.get("Last-Event-ID") or request.args.get("after"))


def start_turn(rt: Runtime, db: Session, uid: str, turn: Turn) -> idempotency.Answer:
    """A committed turn: tell the user's feed, send the task, answer 202."""
    enqueue(rt, db, uid, turn)
    return {
        "chatId": turn.chat_id,
        "messageId": turn.message_id,
        "userMessageId": turn.question_id,
        "streamId": turn.stream_id,
        "ws": f"/api/v1/streams/{turn.stream_id}/ws",
        "events": f"/api/v1/streams/{turn.stream_id}/events",
    }, 202


def wants_events() -> bool:
    """Whether the client asked for the answer on the post's own response: an Accept header
    that prefers ``text/event-stream`` to JSON (``*/*`` alone keeps JSON)."""
    best = request.accept_mimetypes.best_match([JSON, EVENT_STREAM])
    return best == EVENT_STREAM


def answer_turn(
    rt: Runtime, db: Session, uid: str, key: str | None, produce: Callable[[], idempotency.Answer]
) -> Response | tuple[Response, int]:
    """A turn-starting post's answer: 202 with the turn as JSON; or, when the client asked for
    events, 200 SSE: a ``turn`` event (the same fields, no ``id``), then the answer's events
    as ``GET /api/v1/streams/<streamId>/events`` serves them. A retry with the first post's
    Idempotency-Key starts nothing and resumes after ``Last-Event-ID`` (or ``?after``)."""
    if not wants_events():
        return idempotency.answer_once(rt.log.redis, uid, key, produce)
    after = last_event_id()  # checked before anything is written
    batched = parse_batch(request.args.get("batch"))
    if after and key is None:
        raise InvalidAfter("after / Last-Event-ID resumes a retried post: send its Idempotency-Key")

    def first() -> idempotency.Answer:
        if after:  # this key starts a turn: there is nothing of it to skip yet
            raise InvalidAfter(f"after={after}: no post with this Idempotency-Key was answered")
        return produce()

    body, _, replayed = idempotency.run_once(rt.log.redis, uid, key, first)
    sid = body["streamId"]
    stream = stream_ref(db, uid, sid) if replayed else StreamRef(sid, "queued", 0)
    preface = f"event: turn\ndata: {json.dumps({'type': 'turn', **body})}\n\n"
    response = sse_response(rt, stream, after, batched, preface)
    if replayed:
        response.headers[idempotency.REPLAYED_HEADER] = "true"
    return response


@bp.post("/chat")
def post_chat() -> Response | tuple[Response, int]:
    rt = get_runtime()
    db = get_db()
    body = json_object()
    text = message_text(body, rt.settings.max_message_chars)
    chat_id = optional_id(body, "chatId")
    model = requested_model(body, rt.settings)
    detach_after_s = requested_detach(body, rt.settings)
    interrupt = body.get("interrupt") is True
    key = idempotency.requested_key()
    uid = current_user_id(db)

    def post() -> idempotency.Answer:
        # Every Redis call comes before the first SQL write: with SQLite, a write transaction
        # left open while this greenlet waits on Redis would stall every other writer of
        # the process (SQLite's busy wait does not yield to gevent).
        with ratelimit.admitted(rt, db, uid):
            if chat_id is not None:
                get_chat(db, uid, chat_id)
            check_not_busy(rt, db, chat_id, interrupt)
            ensure_user(db, uid)
            turn = add_turn(db, uid, chat_id, text, model, detach_after_s)
            commit_turn(db, turn)  # the rows exist before any worker can look for them
        return start_turn(rt, db, uid, turn)

    return answer_turn(rt, db, uid, key, post)


@bp.get("/chat")
def resume_chat() -> Response:
    """The seed's resume endpoint: the chat's live stream, else its just-finished answer."""
    rt = get_runtime()
    db = get_db()
    chat_id = request.args.get("chatId")
    if not chat_id:
        raise BadRequest("chatId is required")
    check_id(chat_id, ChatNotFound)
    after = last_event_id()
    chat = get_chat(db, current_user_id(db), chat_id)
    stream = latest_stream(db, chat.id)
    if stream is not None and stream.status in ACTIVE_STREAM_STATUSES:
        batched = parse_batch(request.args.get("batch"))
        return sse_response(rt, StreamRef.of(stream), after, batched)
    recent = utcnow() - timedelta(seconds=rt.settings.resume_fallback_s)
    answer = db.scalar(
        select(Message)
        .where(Message.chat_id == chat.id, Message.role == "assistant")
        .order_by(Message.position.desc())
        .limit(1)
    )
    # after > 0: the client already read this stream; sending it whole again would duplicate.
    fresh = answer is not None and answer.status == "complete" and answer.updated_at >= recent
    if answer is not None and fresh and after == 0:
        return snapshot_response(answer.content, answer.id)
    return Response(status=204)


@bp.get("/chats")
def list_chats() -> Response:
    """The user's chats, newest first: at most RELAY_LIST_PAGE_SIZE, or ``?limit=`` fewer;
    ``?q=`` keeps those whose title contains it (ignoring case)."""
    db = get_db()
    uid = current_user_id(db)
    most = get_runtime().settings.list_page_size
    limit = parse_limit(request.args.get("limit"), most)
    query = search_query(request.args.get("q"))
    return jsonify(chats=[chat_json(c) for c in list_chats_of(db, uid, limit, query)])


def parse_limit(raw: str | None, most: int) -> int:
    if raw is None:
        return most
    if not (raw.isascii() and raw.isdigit()) or not 0 < int(raw) <= most:  # not '²'
        raise BadRequest(f"limit must be a whole number from 1 to {most}")
    return int(raw)


@bp.get("/chats/<chat_id>")
def show_chat(chat_id: str) -> Response:
    db = get_db()
    chat = get_chat(db, current_user_id(db), chat_id)
    return jsonify(chat_detail_json(db, chat))


@bp.delete("/chats/<chat_id>")
def delete_chat(chat_id: str) -> tuple[str, int]:
    """Delete a chat of this user: its answers (a running one is stopped), SQL rows and logs."""
    rt = get_runtime()
    db = get_db()
    chat = get_chat(db, current_user_id(db), chat_id)
    # What the feed says, read first: a deletion done again expires the loaded row.
    user_id, gone = chat.user_id, {"chatId": chat.id, "title": chat.title}
    lifecycle.delete_chats(rt.log, db, [chat.id])
    feed.publish(rt, user_id, feed.CHAT_DELETED, **gone)
    return "", 204


@bp.patch("/chats/<chat_id>")
def rename(chat_id: str) -> Response:
    """Rename a chat of this user: ``{"title": ...}`` (422 ``invalid_title``)."""
    rt = get_runtime()
    db = get_db()
    chat = get_chat(db, current_user_id(db), chat_id)
    rename_chat(db, chat, title_from(json_object()))
    feed.publish_chat(rt, chat.user_id, feed.CHAT_RENAMED, chat)
    return jsonify(chat_json(chat))


@bp.post("/chats/<chat_id>/regenerate")
def regenerate(chat_id: str) -> Response | tuple[Response, int]:
    """Replace the chat's last answer, once it has ended, with a new answer to the same user
    message: the old message, stream and log are deleted. Admitted like a post (limits,
    Idempotency-Key); the body is optional (``{"model": ...}``)."""
    rt = get_runtime()
    db = get_db()
    body = json_object() if request.get_data() else {}
    asked = requested_model(body, rt.settings) if body.get("model") is not None else None
    key = idempotency.requested_key()
    uid = current_user_id(db)

    def produce() -> idempotency.Answer:
        chat = get_chat(db, uid, chat_id)
        check_regenerable(db, chat)  # 409 before it counts against the user's limits
        with ratelimit.admitted(rt, db, uid):
            db.expire_all()  # read again under the user's admission lock
            old, old_stream = check_regenerable(db, chat)
            model = asked or _kept_model(old.model, rt.settings)
            turn = replace_answer(rt, db, chat, old, old_stream, model)
            commit_turn(db, turn)
        return start_turn(rt, db, uid, turn)

    return answer_turn(rt, db, uid, key, produce)


def _kept_model(model: str | None, settings: Settings) -> str:
    """A regenerated answer asks the model of the answer it replaces, while it is allowed."""
    return model if model and settings.allows_model(model) else settings.model


@bp.get("/models")
def list_models() -> Response:
    """The models a post may name: the default first, then the others allowed."""
    current_user_id(get_db())  # the same identity rules as every endpoint (401)
    settings = get_runtime().settings
    models = list(dict.fromkeys([settings.model, *settings.allowed_models]))
    return jsonify(default=settings.model, models=models)


@bp.get("/streams/<stream_id>")
def show_stream(stream_id: str) -> Response:
    db = get_db()
    stream = get_stream(db, current_user_id(db), stream_id)
    return jsonify(stream_json(get_runtime(), stream))


@bp.post("/streams/<stream_id>/cancel")
def cancel(stream_id: str) -> tuple[Response, int]:
    rt = get_runtime()
    db = get_db()
    stream = get_stream(db, current_user_id(db), stream_id)
    result = cancel_stream(rt, db, stream)
    if result == "finished" and stream_json(rt, stream)["status"] != "cancelled":
        raise StreamFinished(f"stream {stream_id} has already ended")
    return jsonify(streamId=stream_id, status=_cancel_status(result)), 202


@bp.post("/streams/<stream_id>/retry")
def retry(stream_id: str) -> tuple[Response, int]:
    """Continue a failed or cancelled answer on the same stream: a ``resumed`` event, then
    the rest (``lifecycle.retry``, as the admin CLI's ``streams retry``). Admitted like a post."""
    rt = get_runtime()
    db = get_db()
    uid = current_user_id(db)
    stream = get_stream(db, uid, stream_id)
    check_retryable(db, stream)  # 409 before it counts against the user's limits
    with ratelimit.admitted(rt, db, uid):
        seq = retry_stream(rt, db, stream)
    return jsonify(
        streamId=stream.id,
        chatId=stream.chat_id,
        messageId=stream.message_id,
        status="queued",
        resumedSeq=seq,
        ws=f"/api/v1/streams/{stream.id}/ws",
        events=f"/api/v1/streams/{stream.id}/events",
    ), 202


@bp.get("/streams/<stream_id>/events")
def stream_events(stream_id: str) -> Response:
    rt = get_runtime()
    db = get_db()
    after = last_event_id()
    batched = parse_batch(request.args.get("batch"))
    stream = stream_ref(db, current_user_id(db), stream_id)
    return sse_response(rt, stream, after, batched)


def _cancel_status(result: str) -> str:
    return "cancelling" if result == "requested" else "cancelled"


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
