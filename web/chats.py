"""Chats, messages and streams as the API sees them: lookups scoped to their owner, the
new-turn transaction, cancel, and the JSON shapes."""

from __future__ import annotations

import contextlib
import logging
from datetime import datetime
from typing import Any, NamedTuple

from redis.exceptions import RedisError
from sqlalchemy import bindparam, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from models import lifecycle, store
from models.events import error_event
from models.exceptions import BrokerUnavailable, ChatBusy, ChatNotFound, StreamNotFound
from models.tables import ACTIVE_STREAM_STATUSES, Chat, Message, Stream, new_id, utcnow
from web.runtime import Runtime
from workers.celery_app import GENERATE

log = logging.getLogger("relay.web")


def get_chat(db: Session, uid: str, chat_id: str) -> Chat:
    chat = db.get(Chat, chat_id)
    if chat is None or chat.user_id != uid:
        raise ChatNotFound(f"no chat {chat_id!r} for this user")
    return chat


def get_stream(db: Session, uid: str, stream_id: str) -> Stream:
    stream = db.scalar(select(Stream).join(Chat).where(Stream.id == stream_id, Chat.user_id == uid))
    if stream is None:
        raise StreamNotFound(f"no stream {stream_id!r} for this user")
    return stream


class StreamRef(NamedTuple):
    """What attaching to a stream needs from SQL (read as columns: no ORM object)."""

    id: str
    status: str
    last_seq: int

    @classmethod
    def of(cls, stream: Stream) -> StreamRef:
        return cls(stream.id, stream.status, stream.last_seq)


# Built once, run on the session's connection: an attach pays for the query, not for
# building the statement and the ORM's execution path (three quarters of its cost when a
# thousand viewers attach at once).
_streams, _chats = Stream.__table__.c, Chat.__table__.c
_STREAM_REF = (
    select(_streams.id, _streams.status, _streams.last_seq)
    .join_from(Stream.__table__, Chat.__table__, _streams.chat_id == _chats.id)
    .where(_streams.id == bindparam("sid"), _chats.user_id == bindparam("uid"))
)
_CHAT_OWNER = select(_chats.user_id).where(_chats.id == bindparam("cid"))
_LATEST_REF = (
    select(_streams.id, _streams.status, _streams.last_seq)
    .where(_streams.chat_id == bindparam("cid"))
    .order_by(_streams.created_at.desc())
    .limit(1)
)


def stream_ref(db: Session, uid: str, stream_id: str) -> StreamRef:
    row = db.connection().execute(_STREAM_REF, {"sid": stream_id, "uid": uid}).first()
    if row is None:
        raise StreamNotFound(f"no stream {stream_id!r} for this user")
    return StreamRef(str(row[0]), str(row[1]), int(row[2]))


def latest_stream_ref(db: Session, uid: str, chat_id: str) -> StreamRef:
    """The chat's newest stream (ChatNotFound for another user's chat)."""
    conn = db.connection()
    owner = conn.execute(_CHAT_OWNER, {"cid": chat_id}).scalar()
    if owner is None or owner != uid:
        raise ChatNotFound(f"no chat {chat_id!r} for this user")
    row = conn.execute(_LATEST_REF, {"cid": chat_id}).first()
    if row is None:
        raise StreamNotFound(f"chat {chat_id} has no stream yet")
    return StreamRef(str(row[0]), str(row[1]), int(row[2]))


def latest_stream(db: Session, chat_id: str) -> Stream | None:
    return db.scalar(
        select(Stream).where(Stream.chat_id == chat_id).order_by(Stream.created_at.desc()).limit(1)
    )


def active_stream(db: Session, chat_id: str) -> Stream | None:
    stream = latest_stream(db, chat_id)
    return stream if stream is not None and stream.status in ACTIVE_STREAM_STATUSES else None


def add_turn(
    db: Session, uid: str, chat_id: str | None, text: str, model: str | None = None
) -> tuple[Chat, Stream, str]:
    """Create the user message, the pending answer and its stream (not yet committed);
    returns the chat, the stream and the user message's id."""
    # IDs are chosen here rather than at INSERT time, so the whole turn goes to the
    # database in the one flush of its commit.
    if chat_id is None:
        chat = Chat(id=new_id(), user_id=uid, title=_title(text))
        db.add(chat)
        position = 0
    else:
        chat = get_chat(db, uid, chat_id)
        last = db.scalar(select(func.max(Message.position)).where(Message.chat_id == chat.id))
        position = -1 if last is None else last
        position += 1
    now = utcnow()
    chat.updated_at = now
    question = Message(id=new_id(), chat_id=chat.id, position=position, role="user",
                       content=text)  # fmt: skip
    answer = Message(
        id=new_id(), chat_id=chat.id, position=position + 1, role="assistant",
        status="pending", model=model,
    )  # fmt: skip
    stream = Stream(id=new_id(), chat_id=chat.id, message_id=answer.id, status="queued")
    db.add_all([question, answer, stream])
    return chat, stream, question.id


def commit_turn(db: Session) -> None:
    """Commit the new turn; a concurrent post to the same chat loses with 409."""
    try:
        db.commit()
    except IntegrityError as exc:
        db.rollback()
        raise ChatBusy("another message was posted to this chat at the same time") from exc


def enqueue(rt: Runtime, db: Session, stream: Stream) -> None:
    """Hand the committed stream to a worker; the first attempt's task id is the stream ID."""
    try:
        rt.log.init(stream.id)
        rt.celery.send_task(GENERATE, args=[stream.id], task_id=stream.id)
    except Exception as exc:
        log.exception("stream=%s could not be enqueued", stream.id)
        _fail_unqueued(rt, db, stream)
        raise BrokerUnavailable("the task queue is unreachable; try again shortly") from exc


def _fail_unqueued(rt: Runtime, db: Session, stream: Stream) -> None:
    """End a stream that never reached the queue, in SQL and (if reachable) in the log."""
    error = store.ErrorInfo("broker_unavailable", "the task queue was unreachable")
    store.finalize(db, stream.id, status="failed", text="", layout=[], attempt=None, error=error)
    with contextlib.suppress(RedisError):
        rt.log.seal(stream.id, [error_event(1, error.code, error.message)], 0)


def check_not_busy(rt: Runtime, db: Session, chat_id: str | None, interrupt: bool) -> None:
    """Reject (409) or interrupt a post to a chat whose answer is still streaming."""
    if chat_id is None:
        return
    busy = active_stream(db, chat_id)
    if busy is None:
        return
    if not interrupt and rt.settings.chat_busy_policy != "interrupt":
        raise ChatBusy(
            f"the answer in stream {busy.id} is still being generated; wait for it, cancel it, "
            'or post with "interrupt": true'
        )
    cancel_stream(rt, db, busy)


def cancel_stream(rt: Runtime, db: Session, stream: Stream) -> str:
    """Ask the stream to stop; when nobody is writing it, end it here and save its text."""
    return lifecycle.cancel(rt.log, db, stream, rt.settings.heartbeat_stale_s)


def _title(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= 80 else line[:77] + "..."


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value else None


def chat_json(chat: Chat) -> dict[str, Any]:
    return {
        "id": chat.id,
        "title": chat.title,
        "createdAt": _iso(chat.created_at),
        "updatedAt": _iso(chat.updated_at),
    }


def chat_detail_json(db: Session, chat: Chat) -> dict[str, Any]:
    # One statement, so a message's content and its stream's seq come from one snapshot
    # even under READ COMMITTED while a worker checkpoints.
    rows = db.execute(
        select(Message, Stream)
        .outerjoin(Stream, Stream.message_id == Message.id)
        .where(Message.chat_id == chat.id)
        .order_by(Message.position)
    )
    messages = [
        {
            "id": m.id,
            "role": m.role,
            "content": m.content,
            "status": m.status,
            "streamId": stream.id if stream else None,
            # The seq of the last chunk included in ``content``: attach with after=<this>.
            "streamSeq": store.chunk_count(stream) if stream else None,
            "createdAt": _iso(m.created_at),
            "error": {"code": stream.error_code, "message": stream.error_message or ""}
            if stream is not None and stream.error_code
            else None,
            **(
                {"model": m.model, "usage": _usage(m), "finishReason": m.finish_reason}
                if m.role == "assistant"
                else {}
            ),
        }
        for m, stream in rows.tuples()
    ]
    return {**chat_json(chat), "messages": messages}


def _usage(m: Message) -> dict[str, int] | None:
    if m.prompt_tokens is None and m.completion_tokens is None:
        return None
    return {"promptTokens": m.prompt_tokens or 0, "completionTokens": m.completion_tokens or 0}


def stream_json(rt: Runtime, stream: Stream) -> dict[str, Any]:
    """Status of a stream: SQL, overlaid with the live state from Redis while it exists."""
    live = rt.log.state(stream.id)
    status = live.status or stream.status
    last_seq = max(live.last_seq, stream.last_seq)
    out: dict[str, Any] = {
        "id": stream.id,
        "status": status,
        "lastSeq": last_seq,
        "attempt": max(live.attempt, stream.attempt),
        "chatId": stream.chat_id,
        "messageId": stream.message_id,
        "createdAt": _iso(stream.created_at),
        "startedAt": _iso(stream.started_at),
        "finishedAt": _iso(stream.finished_at),
        "updatedAt": _iso(stream.updated_at),
        "error": None,
    }
    if stream.error_code:
        out["error"] = {"code": stream.error_code, "message": stream.error_message or ""}
    return out
