"""Chats, messages and streams as the API sees them: lookups scoped to their owner, the
new-turn transaction, cancel, and the JSON shapes."""

from __future__ import annotations

import contextlib
import functools
import logging
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import RedisError
from sqlalchemy import Executable, Table, bindparam, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, object_session

from models import feed, lifecycle, store
from models.events import error_event
from models.exceptions import (
    BadRequest,
    BrokerUnavailable,
    ChatBusy,
    ChatNotFound,
    IllegalTransition,
    InvalidTitle,
    StreamNotFound,
)
from models.redisconn import OUTAGES, described, run_together
from models.tables import (
    ACTIVE_STREAM_STATUSES,
    TERMINAL_STREAM_STATUSES,
    Chat,
    Message,
    Stream,
    new_id,
    utcnow,
)
from ops.geventfix import start_background
from web.inputs import storable
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
_streams, _chats, _messages = Stream.__table__.c, Chat.__table__.c, Message.__table__.c
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


@dataclass(frozen=True)
class Turn:
    """A new turn before it is committed: ids chosen here, so the turn is written in one
    transaction of prebuilt Core statements (``commit_turn``) and announced without reading
    anything back. ``rows``: the statements to run and their parameters, in order."""

    chat_id: str
    title: str
    question_id: str
    message_id: str  # the pending answer
    stream_id: str
    detach_after_s: int | None
    new_chat: bool
    rows: tuple[tuple[Executable, list[dict[str, Any]]], ...]


# The new turn's statements, built once like those above (the ORM's unit of work cost three
# times the rows' own insert, on the path from a post to its first chunk).
_CHATS: Table = Chat.__table__  # type: ignore[assignment]
_MESSAGES: Table = Message.__table__  # type: ignore[assignment]
_STREAMS: Table = Stream.__table__  # type: ignore[assignment]
_INSERT_CHAT = _CHATS.insert()
_INSERT_MESSAGES = _MESSAGES.insert()
_INSERT_STREAM = _STREAMS.insert()
_TOUCH_CHAT = (
    _CHATS.update().where(_chats.id == bindparam("cid")).values(updated_at=bindparam("b_now"))
)
_LAST_POSITION = select(func.max(_messages.position)).where(_messages.chat_id == bindparam("cid"))


def add_turn(
    db: Session,
    uid: str,
    chat_id: str | None,
    text: str,
    model: str | None = None,
    detach_after_s: int | None = None,
    client_id: str | None = None,
) -> Turn:
    """The user message, the pending answer and its stream of a new turn, in a new chat
    (``chat_id`` None, named ``client_id`` by the client when given) or at the end of the
    user's chat ``chat_id``; written by ``commit_turn``. This is on the path from a post to
    its first chunk: plain rows through prebuilt statements, no ORM unit of work."""
    now = utcnow()
    question_id, answer_id, stream_id = new_id(), new_id(), new_id()
    if chat_id is None:
        chat_id, title, position = new_id(), _title(text), 0
        chat_row = {"id": chat_id, "user_id": uid, "client_id": client_id, "title": title,
                    "created_at": now, "updated_at": now}  # fmt: skip
        head: tuple[Executable, list[dict[str, Any]]] = (_INSERT_CHAT, [chat_row])
    else:
        title = get_chat(db, uid, chat_id).title
        last = db.connection().execute(_LAST_POSITION, {"cid": chat_id}).scalar()
        position = 0 if last is None else last + 1
        head = (_TOUCH_CHAT, [{"cid": chat_id, "b_now": now}])
    messages = [
        _message_row(question_id, chat_id, position, "user", text, "complete", None, now),
        _message_row(answer_id, chat_id, position + 1, "assistant", "", "pending", model, now),
    ]
    stream = _stream_row(stream_id, chat_id, answer_id, detach_after_s, now)
    rows = (head, (_INSERT_MESSAGES, messages), (_INSERT_STREAM, [stream]))
    return Turn(chat_id, title, question_id, answer_id, stream_id, detach_after_s,
                new_chat=head[0] is _INSERT_CHAT, rows=rows)  # fmt: skip


def _message_row(
    mid: str, chat_id: str, position: int, role: str, content: str, status: str,
    model: str | None, now: datetime,
) -> dict[str, Any]:  # fmt: skip
    return {"id": mid, "chat_id": chat_id, "position": position, "role": role,
            "content": content, "status": status, "model": model, "created_at": now,
            "updated_at": now}  # fmt: skip


def _stream_row(
    sid: str, chat_id: str, message_id: str, detach_after_s: int | None, now: datetime
) -> dict[str, Any]:
    return {"id": sid, "chat_id": chat_id, "message_id": message_id, "status": "queued",
            "attempt": 0, "last_seq": 0, "seq_layout": "[]", "detach_after_s": detach_after_s,
            "created_at": now, "updated_at": now}  # fmt: skip


def client_chat(db: Session, uid: str, client_id: str) -> Chat | None:
    """The user's chat that the client named ``client_id`` (the AI SDK's chat id): ids a
    client chooses are scoped to their user, so another user's chat is simply not found."""
    return db.scalar(select(Chat).where(Chat.user_id == uid, Chat.client_id == client_id))


def add_client_turn(
    db: Session,
    uid: str,
    client_id: str,
    found: Chat | None,
    text: str,
    model: str | None,
    detach_after_s: int | None = None,
) -> Turn:
    """``add_turn`` for the chat the client names ``client_id`` (``found``: ``client_chat``'s
    answer). Its first turn creates the chat under that id; two first posts racing collide
    on the unique (user, client id) at commit, which ``commit_turn`` answers 409."""
    return add_turn(db, uid, found.id if found else None, text, model, detach_after_s,
                    client_id=client_id)  # fmt: skip


def commit_turn(db: Session, turn: Turn) -> None:
    """Write the new turn and commit; a concurrent post to the same chat loses with 409 (the
    unique message position, or the unique client id of a new chat)."""
    try:
        db.flush()  # anything the session holds goes first (the replaced answer's deletes)
        conn = db.connection()
        for statement, params in turn.rows:
            conn.execute(statement, params)
        db.commit()
    except IntegrityError as exc:
        db.rollback()
        raise ChatBusy("another message was posted to this chat at the same time") from exc


# What a send to a broker or Redis that is down raises (kombu's for the broker's connection).
_SEND_OUTAGES = (*OUTAGES, BrokerError)


def enqueue(rt: Runtime, db: Session, uid: str, turn: Turn) -> None:
    """Announce the committed turn and hand its stream to a worker: the feed's events and the
    log's init in one round trip (a feed that could not be written is logged, and the turn
    goes on), then the task, whose id (the first attempt's) is the stream ID."""
    stream_id = turn.stream_id
    events = feed.turn_events(turn.chat_id, turn.title, stream_id, turn.message_id,
                              new_chat=turn.new_chat)  # fmt: skip
    calls = [feed.Feed(rt.log.redis).append_call(uid, *events),
             rt.log.init_call(stream_id, turn.detach_after_s)]  # fmt: skip
    try:
        try:
            fed, init = run_together(rt.log.redis, calls)
        except Exception as exc:
            feed.not_written(uid, events, exc)
            raise
        if isinstance(fed, Exception):
            feed.not_written(uid, events, fed)
        if isinstance(init, Exception):
            raise init
        rt.celery.send_task(GENERATE, args=[stream_id], task_id=stream_id)
    except Exception as exc:
        log.warning("stream=%s could not be enqueued: %s", stream_id, described(exc),
                    exc_info=not isinstance(exc, _SEND_OUTAGES))  # fmt: skip
        _fail_unqueued(rt, db, stream_id)
        raise BrokerUnavailable("the task queue is unreachable; try again shortly") from exc
    # Sent: without this mark (this process died just before it), the sweeper sends the
    # committed stream's task itself after a few seconds. Only the sweeper reads it, so the
    # post does not wait for its round trip (a greenlet of its own under gevent, not even
    # for it to start; else a thread): one Redis round trip less between a post and its 202.
    start_background(functools.partial(_mark_sent, rt, stream_id), "mark-sent")


def _mark_sent(rt: Runtime, stream_id: str) -> None:
    with contextlib.suppress(RedisError):
        rt.log.mark_sent(stream_id)


def _fail_unqueued(rt: Runtime, db: Session, stream_id: str) -> None:
    """End a stream that never reached the queue, in SQL and (if reachable) in the log."""
    error = store.ErrorInfo("broker_unavailable", "the task queue was unreachable")
    store.finalize(db, stream_id, status="failed", text="", layout=[], attempt=None, error=error)
    with contextlib.suppress(RedisError):
        rt.log.seal(stream_id, [error_event(1, error.code, error.message)], 0)
    feed.publish_answer(rt, db, stream_id, feed.ANSWER_FINISHED, "failed")


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


RETRYABLE_STATUSES = ("failed", "cancelled")


def retry_stream(rt: Runtime, db: Session, stream: Stream) -> int:
    """Continue a failed or cancelled answer on the same stream (``lifecycle.retry``, the
    admin CLI's ``streams retry``); returns the seq of its ``resumed`` event. The new attempt
    goes to the queue of new chats, as a post's does: a user's retry does not jump it."""
    check_retryable(db, stream)

    def send(stream_id: str, task_id: str) -> None:
        try:
            rt.celery.send_task(GENERATE, args=[stream_id], task_id=task_id)
        except Exception as exc:  # the stream stays queued: the sweeper sends it
            log.warning("stream=%s retry could not be enqueued: %s", stream_id, described(exc),
                        exc_info=not isinstance(exc, _SEND_OUTAGES))  # fmt: skip
            raise BrokerUnavailable(
                "the task queue is unreachable; the retry is stored and starts by itself shortly"
            ) from exc

    seq, _task_id = lifecycle.retry(rt.log, db, stream.id, send)
    return seq


def check_retryable(db: Session, stream: Stream) -> None:
    """409 unless ``stream`` ended failed or cancelled and its chat has no other answer
    in progress (a chat has at most one)."""
    if stream.status not in RETRYABLE_STATUSES:
        raise IllegalTransition(
            f"stream {stream.id} is {stream.status}; only failed or cancelled answers can be "
            "retried"
        )
    busy = active_stream(db, stream.chat_id)
    if busy is not None and busy.id != stream.id:
        raise ChatBusy(
            f"the answer in stream {busy.id} is still being generated; wait for it or cancel it"
        )


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
    ended = live.status not in (None, *ACTIVE_STREAM_STATUSES)
    if ended and stream.status in ACTIVE_STREAM_STATUSES:
        # The row was read before the log's end: the end is stored in SQL before the
        # terminal event is written, so a fresh read has it (its error, its finish time).
        session = object_session(stream)
        if session is not None:
            session.refresh(stream)
    status = live.status or stream.status
    if stream.status in TERMINAL_STREAM_STATUSES and status in ACTIVE_STREAM_STATUSES:
        # An end is stored in SQL before the log's terminal event is written: a writer that
        # died in between leaves the log running until the sweeper writes that event from
        # SQL, and a viewer may already have it from SQL. The stream has ended.
        status = stream.status
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
        "endReason": stream.end_reason,
        "onDetach": detach_json(rt, stream, status),
    }
    if stream.error_code:
        out["error"] = {"code": stream.error_code, "message": stream.error_message or ""}
    return out


def detach_json(rt: Runtime, stream: Stream, status: str) -> dict[str, Any]:
    """The stream's detach policy; while it is active, whether a viewer is attached and
    when the answer will be cancelled if none comes back (Redis's clock)."""
    if stream.detach_after_s is None:
        return {"policy": "continue"}
    out: dict[str, Any] = {"policy": "cancel-after", "seconds": stream.detach_after_s}
    if status in ACTIVE_STREAM_STATUSES:
        countdown = rt.log.detach_status(stream.id)
        cancel_at = countdown.cancel_at_ms
        out["watched"] = countdown.unwatched_since_ms is None
        out["cancelAt"] = None if cancel_at is None else _iso_ms(cancel_at)
    return out


def _iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


# -- rename, search, regenerate (the chat page's actions) ------------------------------------

MAX_TITLE_CHARS = 200  # the column's size
MAX_QUERY_CHARS = 200
# Unicode categories a title may not hold: control characters (C0, DEL, C1) and the line and
# paragraph separators, so a title stays one line wherever it is shown.
_FORBIDDEN_IN_TITLE = ("Cc", "Zl", "Zp")


def title_from(body: dict[str, Any]) -> str:
    """The new title of a rename: ``title``, stripped, 1-200 characters, no control
    character; else InvalidTitle (422)."""
    value = body.get("title")
    if not isinstance(value, str):
        raise InvalidTitle('"title" must be a string')
    title = value.strip()
    if not 0 < len(title) <= MAX_TITLE_CHARS:
        raise InvalidTitle(f'"title" must be 1 to {MAX_TITLE_CHARS} characters (after trimming)')
    if any(unicodedata.category(c) in _FORBIDDEN_IN_TITLE for c in title):
        raise InvalidTitle('"title" must not contain control characters or line breaks')
    return storable(title, '"title"', InvalidTitle)


def rename_chat(db: Session, chat: Chat, title: str) -> None:
    """Give the chat a new title. ``updatedAt`` stays: the list is ordered by activity, and
    a rename is not a turn."""
    chat.title = title
    db.commit()


def search_query(raw: str | None) -> str | None:
    """The ``q`` of a chat search: None (no search) when absent or blank, else the text."""
    if raw is None or not raw.strip():
        return None
    if len(raw) > MAX_QUERY_CHARS or "\x00" in raw:
        raise BadRequest(f"q must be at most {MAX_QUERY_CHARS} characters, without NUL")
    return raw.strip()


def list_chats_of(db: Session, uid: str, limit: int, query: str | None = None) -> list[Chat]:
    """The user's chats, most recently updated first; with ``query``, only those whose title
    contains it, ignoring case (LIKE wildcards in it match themselves). Ties (chats updated
    in the same instant) come in the same order on every call, so a poll does not reorder
    an unchanged list."""
    stmt = select(Chat).where(Chat.user_id == uid)
    if query is not None:
        stmt = stmt.where(Chat.title.icontains(query, autoescape=True))
    return list(db.scalars(stmt.order_by(Chat.updated_at.desc(), Chat.id.desc()).limit(limit)))


def last_answer(db: Session, chat_id: str) -> tuple[Message, Stream | None] | None:
    """The chat's last assistant message and its stream, or None when it has none."""
    answer = db.scalar(
        select(Message)
        .where(Message.chat_id == chat_id, Message.role == "assistant")
        .order_by(Message.position.desc())
        .limit(1)
    )
    if answer is None:
        return None
    return answer, db.scalar(select(Stream).where(Stream.message_id == answer.id))


def check_regenerable(db: Session, chat: Chat) -> tuple[Message, Stream | None]:
    """The chat's last answer if it may be replaced: it has ended (done, failed or
    cancelled) and no other answer of the chat is in progress; else 409."""
    found = last_answer(db, chat.id)
    if found is None:
        raise IllegalTransition(f"chat {chat.id} has no answer to regenerate yet")
    answer, stream = found
    if stream is not None and stream.status in ACTIVE_STREAM_STATUSES:
        raise IllegalTransition(
            f"the last answer (stream {stream.id}) is still {stream.status}; stop it or wait "
            "for it before regenerating"
        )
    busy = db.scalar(
        select(Stream.id).where(
            Stream.chat_id == chat.id, Stream.status.in_(ACTIVE_STREAM_STATUSES)
        )
    )
    if busy is not None:
        raise ChatBusy(
            f"the answer in stream {busy} is still being generated; wait for it or cancel it"
        )
    return answer, stream


def replace_answer(
    rt: Runtime, db: Session, chat: Chat, old: Message, old_stream: Stream | None, model: str
) -> Turn:
    """Delete the chat's last answer (message, stream, log) and put a new pending answer in
    its place, for the same user message (written by ``commit_turn``). The log goes first,
    as ``lifecycle.delete_chats`` does: Redis before any SQL write (a failure after it
    leaves rows SQL can replay)."""
    if old_stream is not None:
        rt.log.forget([old_stream.id])
        db.delete(old_stream)
        db.flush()
    position = old.position
    detach_after_s = old_stream.detach_after_s if old_stream is not None else None
    db.delete(old)
    db.flush()  # the old answer's position is free before the new one takes it
    question_id = db.scalar(
        select(Message.id).where(Message.chat_id == chat.id, Message.position == position - 1)
    )
    now = utcnow()
    answer_id, stream_id = new_id(), new_id()
    answer = _message_row(answer_id, chat.id, position, "assistant", "", "pending", model, now)
    stream = _stream_row(stream_id, chat.id, answer_id, detach_after_s, now)
    rows = ((_TOUCH_CHAT, [{"cid": chat.id, "b_now": now}]), (_INSERT_MESSAGES, [answer]),
            (_INSERT_STREAM, [stream]))  # fmt: skip
    log.info("chat=%s answer %s replaced by %s", chat.id, old.id, answer_id)
    return Turn(chat.id, chat.title, question_id or "", answer_id, stream_id, detach_after_s,
                new_chat=False, rows=rows)  # fmt: skip
