"""The HTTP API under /api/v1: post a message, list chats, stream status, cancel, SSE."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, request
from sqlalchemy import select

from models.exceptions import (
    BadRequest,
    InvalidJSON,
    InvalidMessage,
    MessageTooLarge,
    ModelNotAllowed,
    StreamFinished,
)
from models.settings import Settings
from models.tables import ACTIVE_STREAM_STATUSES, Chat, Message, utcnow
from web.auth import current_user_id, ensure_user
from web.chats import (
    StreamRef,
    add_turn,
    cancel_stream,
    chat_detail_json,
    chat_json,
    check_not_busy,
    commit_turn,
    enqueue,
    get_chat,
    get_stream,
    latest_stream,
    stream_json,
    stream_ref,
)
from web.runtime import get_db, get_runtime
from web.streaming import parse_after, parse_batch, snapshot_response, sse_response

bp = Blueprint("api", __name__, url_prefix="/api/v1")


def json_body() -> dict[str, Any]:
    data = request.get_json(silent=True, force=True)
    if not isinstance(data, dict):
        raise InvalidJSON("the request body must be a JSON object")
    return data


def message_text(body: dict[str, Any], max_chars: int) -> str:
    text = body.get("message")
    if not isinstance(text, str) or not text.strip():
        raise InvalidMessage('"message" must be a non-empty string')
    if len(text) > max_chars:
        raise MessageTooLarge(f'"message" is {len(text)} characters; the limit is {max_chars}')
    return text


def optional_id(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise BadRequest(f'"{name}" must be a string id when given')
    return value


def requested_model(body: dict[str, Any], settings: Settings) -> str:
    """The model to answer with: the default, or an allowed one named in the request."""
    model = body.get("model")
    if model is None:
        return settings.model
    if not isinstance(model, str) or not settings.allows_model(model):
        allowed = ", ".join(sorted({settings.model, *settings.allowed_models}))
        raise ModelNotAllowed(f"model {model!r} is not available here; allowed: {allowed}")
    return model


def last_event_id() -> int:
    """Where an SSE client resumes: Last-Event-ID (sent on reconnect) wins over ?after."""
    return parse_after(request.headers.get("Last-Event-ID") or request.args.get("after"))


@bp.post("/chat")
def post_chat() -> tuple[Response, int]:
    rt = get_runtime()
    db = get_db()
    body = json_body()
    text = message_text(body, rt.settings.max_message_chars)
    chat_id = optional_id(body, "chatId")
    model = requested_model(body, rt.settings)
    interrupt = body.get("interrupt") is True
    uid = current_user_id(db)
    ensure_user(db, uid)
    if chat_id is not None:
        get_chat(db, uid, chat_id)
    check_not_busy(rt, db, chat_id, interrupt)
    chat, stream, question_id = add_turn(db, uid, chat_id, text, model)
    commit_turn(db)  # the rows exist before any worker can look for them
    enqueue(rt, db, stream)
    return jsonify(
        chatId=chat.id,
        messageId=stream.message_id,
        userMessageId=question_id,
        streamId=stream.id,
        ws=f"/api/v1/streams/{stream.id}/ws",
        events=f"/api/v1/streams/{stream.id}/events",
    ), 202


@bp.get("/chat")
def resume_chat() -> Response:
    """The seed's resume endpoint: the chat's live stream, else its just-finished answer."""
    rt = get_runtime()
    db = get_db()
    chat_id = request.args.get("chatId")
    if not chat_id:
        raise BadRequest("chatId is required")
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
    db = get_db()
    uid = current_user_id(db)
    chats = db.scalars(select(Chat).where(Chat.user_id == uid).order_by(Chat.updated_at.desc()))
    return jsonify(chats=[chat_json(c) for c in chats])


@bp.get("/chats/<chat_id>")
def show_chat(chat_id: str) -> Response:
    db = get_db()
    chat = get_chat(db, current_user_id(db), chat_id)
    return jsonify(chat_detail_json(db, chat))


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
