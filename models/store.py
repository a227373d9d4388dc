"""SQL writes and reads about a stream's progress, shared by workers and the web tier."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Integer,
    Select,
    String,
    Table,
    Update,
    bindparam,
    exists,
    func,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeEngine

from models.events import CHUNK, TERMINAL_FOR_STATUS, Event, error_event
from models.tables import ACTIVE_STREAM_STATUSES, Message, Stream, utcnow

MESSAGE_STATUS = {"done": "complete", "cancelled": "cancelled", "failed": "failed"}

# One item per seq before the final terminal event: a chunk's end offset in the content,
# or [type, data] for any other event (see Stream.seq_layout).
LayoutItem = int | list[str]
Layout = list[LayoutItem]


@dataclass(frozen=True)
class ErrorInfo:
    code: str
    message: str


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def layout_item(event: Event, text_length: int) -> LayoutItem:
    """How one non-final event is recorded in seq_layout."""
    if event.type == CHUNK:
        return text_length
    return [event.type, event.payload()]


def load_layout(stream: Stream) -> Layout:
    layout: Layout = json.loads(stream.seq_layout or "[]")
    return layout


_STREAMS: Table = Stream.__table__  # type: ignore[assignment]
_MESSAGES: Table = Message.__table__  # type: ignore[assignment]
_MARK_RUNNING = (
    _STREAMS.update()
    .where(
        _STREAMS.c.id == bindparam("sid"),
        _STREAMS.c.status.in_(ACTIVE_STREAM_STATUSES),
        _STREAMS.c.attempt <= bindparam("b_attempt"),  # equal: again, after a lost reply
    )
    .values(
        status="running", attempt=bindparam("b_attempt"), task_id=bindparam("b_task"),
        updated_at=bindparam("b_now"), started_at=func.coalesce(_STREAMS.c.started_at,
                                                                 bindparam("b_now")),
    )
)  # fmt: skip
_MARK_STREAMING = (
    _MESSAGES.update().where(_MESSAGES.c.id == bindparam("mid")).values(status="streaming")
)


def mark_running(
    db: Session | Connection, stream_id: str, message_id: str, attempt: int, task_id: str
) -> bool:
    """Record that ``attempt`` (run by ``task_id``) now writes the stream; False when SQL has
    ended the stream or a later attempt owns it (the claim is void). Core statements: this
    is on the path from a post to its first chunk (``db``: a session, or a Core connection,
    which the worker passes: no ORM session to set up)."""
    now = utcnow()
    params = {"sid": stream_id, "b_attempt": attempt, "b_task": task_id, "b_now": now}
    return _fenced(db, _MARK_RUNNING, params, _MARK_STREAMING, {"mid": message_id})


# Core statements (no ORM bulk-update machinery): a worker checkpoints every running answer
# every few seconds, so this is the hottest SQL relay runs. Both kinds of checkpoint write
# the stream's row only while this attempt owns it and it is running:
_CHECKPOINTING = (
    _STREAMS.c.id == bindparam("sid"),
    _STREAMS.c.attempt == bindparam("b_attempt"),
    _STREAMS.c.status == "running",
)
_CHECKPOINT_STREAM = (
    _STREAMS.update()
    .where(*_CHECKPOINTING)
    .values(
        last_seq=bindparam("b_last"),
        seq_layout=bindparam("b_layout"),
        updated_at=bindparam("b_now"),
    )
)
_CHECKPOINT_MESSAGE = (
    _MESSAGES.update()
    .where(_MESSAGES.c.id == bindparam("mid"))
    .values(content=bindparam("b_text"), updated_at=bindparam("b_now"))
)


# A later checkpoint of the same attempt sends only what came since the one before: SQL adds
# the new text and layout items to what it holds. Written whole, the answer's text and its
# layout's JSON (an item per piece) were encoded and sent again every interval, a cost that
# grew with the answer's length (a 40 s answer: 14 % of the worker's CPU; docs/performance.md).
# Only when SQL holds exactly the checkpoint before (``last_seq`` = ``b_since`` for this
# attempt, still running): anything else, and the caller writes the whole answer.
_CHECKPOINT_STREAM_MORE = (
    _STREAMS.update()
    .where(*_CHECKPOINTING, _STREAMS.c.last_seq == bindparam("b_since"))
    .values(
        last_seq=bindparam("b_last"),
        # "[a, b]" + "c, d" -> "[a, b, c, d]": the JSON json.dumps writes for the whole list
        seq_layout=func.substr(_STREAMS.c.seq_layout, 1, func.length(_STREAMS.c.seq_layout) - 1)
        + bindparam("b_items", type_=String())
        + "]",
        updated_at=bindparam("b_now"),
    )
)
_CHECKPOINT_MESSAGE_MORE = (
    _MESSAGES.update()
    .where(_MESSAGES.c.id == bindparam("mid"))
    .values(
        content=_MESSAGES.c.content + bindparam("b_more", type_=String()),
        updated_at=bindparam("b_now"),
    )
)


def checkpoint_more(
    db: Session | Connection,
    stream_id: str,
    message_id: str,
    attempt: int,
    since: int,
    items: Layout,
    more: str,
) -> bool:
    """Add to SQL's copy what came after the checkpoint that stored ``since`` layout items
    (at least one): ``items`` (at least one) and their text ``more``. False, with nothing
    written, when SQL does not hold that checkpoint for ``attempt`` of a running stream:
    then ``checkpoint`` writes the whole answer (or finds the attempt stale)."""
    if since < 1 or not items:
        raise ValueError("checkpoint_more adds at least one item to at least one")
    now = utcnow()
    params = {"sid": stream_id, "b_attempt": attempt, "b_since": since,
              "b_last": since + len(items), "b_items": ", " + json.dumps(items)[1:-1],
              "b_now": now}  # fmt: skip
    more_params = {"mid": message_id, "b_more": more, "b_now": now}
    return _fenced(db, _CHECKPOINT_STREAM_MORE, params, _CHECKPOINT_MESSAGE_MORE, more_params)


def checkpoint(
    db: Session | Connection,
    stream_id: str,
    message_id: str,
    attempt: int,
    text: str,
    layout: Layout,
) -> bool:
    """Copy the partial answer to SQL; False when another attempt owns the stream. ``db``: a
    session, or a Core connection (the worker's: no ORM session to set up and tear down)."""
    now = utcnow()
    params = {"sid": stream_id, "b_attempt": attempt, "b_last": len(layout),
              "b_layout": json.dumps(layout), "b_now": now}  # fmt: skip
    text_params = {"mid": message_id, "b_text": text, "b_now": now}
    return _fenced(db, _CHECKPOINT_STREAM, params, _CHECKPOINT_MESSAGE, text_params)


def fenced_writer(conn: Connection) -> Connection:
    """``conn``, ready for fenced writes (``mark_running``, the checkpoints) and nothing
    else: on PostgreSQL in autocommit, since each is one statement there (its own
    transaction: one round trip instead of BEGIN, two UPDATEs and COMMIT); elsewhere as it
    is (two statements in a transaction)."""
    if conn.dialect.name == "postgresql":
        return conn.execution_options(isolation_level="AUTOCOMMIT")
    return conn


@functools.cache
def _fenced_statement(fence: Update, then: Update) -> Select[int]:
    """``fence`` and ``then`` as one PostgreSQL statement: ``then`` runs only when ``fence``
    matched its row, and the statement answers how many rows ``fence`` matched."""
    fenced = fence.returning(_STREAMS.c.id).cte("fenced")
    followed = then.where(exists(select(fenced.c.id))).returning(_MESSAGES.c.id).cte("followed")
    return select(func.count()).select_from(fenced).add_cte(followed)


def _fenced(
    db: Session | Connection,
    fence: Update,
    params: dict[str, Any],
    then: Update,
    then_params: dict[str, Any],
) -> bool:
    """``fence`` (the stream's row, where the attempt may write it), then ``then`` (its
    message), in one transaction; False, with nothing written, when the fence matched no
    row. On PostgreSQL one statement (the two UPDATEs in CTEs), elsewhere two."""
    dialect = db.dialect if isinstance(db, Connection) else db.get_bind().dialect
    if dialect.name == "postgresql":
        if params["b_now"] != then_params.get("b_now", params["b_now"]):
            raise ValueError("a fenced write's two statements share one b_now")
        matched = db.execute(_fenced_statement(fence, then), {**params, **then_params})
        wrote = bool(matched.scalar_one())
        db.commit()  # autocommit (fenced_writer): no round trip
        return wrote
    res = db.execute(fence, params)
    if res.rowcount == 0:  # type: ignore[attr-defined]
        db.rollback()
        return False
    db.execute(then, then_params)
    db.commit()
    return True


# Core statements built once, like the checkpoint's (the ORM's bulk-update machinery was
# four fifths of the call): every answer ends here, on its worker's one event loop, and
# answers that end together would stall every other stream's appends meanwhile.
def _finalize_stream(fence: str) -> Update:
    """The stream's end; ``fence``: "none", "attempt" (only while that attempt owns it) or
    "takeover" (while no later attempt does; the stream's attempt becomes it)."""
    c = _STREAMS.c
    stmt = _STREAMS.update().where(c.id == bindparam("sid"), c.status.in_(ACTIVE_STREAM_STATUSES))
    values: dict[str, Any] = {}
    if fence == "takeover":
        stmt = stmt.where(c.attempt <= bindparam("b_attempt"))
        values["attempt"] = bindparam("b_attempt")
    elif fence == "attempt":
        stmt = stmt.where(c.attempt == bindparam("b_attempt"))
    return stmt.values(
        status=bindparam("b_status"), last_seq=bindparam("b_last"),
        seq_layout=bindparam("b_layout"), content_hash=bindparam("b_hash"),
        error_code=bindparam("b_code"), error_message=bindparam("b_error"),
        end_reason=bindparam("b_reason"), finished_at=bindparam("b_now"),
        updated_at=bindparam("b_now"), **values,
    )  # fmt: skip


_FINALIZE_STREAM = {fence: _finalize_stream(fence) for fence in ("none", "attempt", "takeover")}
# What the provider reported is kept where this end does not say (None: unchanged).
_USAGE: dict[str, TypeEngine[Any]] = {
    "model": String(), "prompt_tokens": Integer(), "completion_tokens": Integer(),
    "finish_reason": String(),
}  # fmt: skip
_FINALIZE_MESSAGE = (
    _MESSAGES.update()
    .where(
        _MESSAGES.c.id
        == select(_STREAMS.c.message_id).where(_STREAMS.c.id == bindparam("sid")).scalar_subquery()
    )
    .values(
        content=bindparam("b_text"), status=bindparam("b_mstatus"), updated_at=bindparam("b_now"),
        **{name: func.coalesce(bindparam(f"b_{name}", type_=kind), _MESSAGES.c[name])
           for name, kind in _USAGE.items()},
    )
)  # fmt: skip


def finalize(
    db: Session | Connection,
    stream_id: str,
    *,
    status: str,
    text: str,
    layout: Layout,
    attempt: int | None,
    takeover: bool = False,
    error: ErrorInfo | None = None,
    usage: dict[str, Any] | None = None,
    reason: str | None = None,
) -> bool:
    """Store the final text and status (the terminal event's seq is len(layout) + 1), and
    why it ended when not plainly (``reason``: ``abandoned``).

    A compare-and-set: only a stream still queued or running ends, so SQL's end is decided
    once. With ``attempt``, only while that attempt owns the stream; with ``takeover`` too,
    while no later attempt does (the stream's attempt becomes ``attempt``, fencing off the
    writer that was taken over). False when refused. ``usage``: what the provider reported
    (``model``, ``prompt_tokens``, ``completion_tokens``, ``finish_reason``)."""
    unknown = set(usage or ()) - _USAGE.keys()
    if unknown:
        raise ValueError(f"not usage fields: {sorted(unknown)}")
    now = utcnow()
    fence = "none" if attempt is None else "takeover" if takeover else "attempt"
    res = db.execute(
        _FINALIZE_STREAM[fence],
        {
            "sid": stream_id, "b_attempt": attempt, "b_status": status,
            "b_last": len(layout) + 1, "b_layout": json.dumps(layout),
            "b_hash": content_hash(text), "b_code": error.code if error else None,
            "b_error": error.message if error else None, "b_reason": reason, "b_now": now,
        },
    )  # fmt: skip
    if res.rowcount == 0:  # type: ignore[attr-defined]
        db.rollback()
        return False
    given = usage or {}
    db.execute(
        _FINALIZE_MESSAGE,
        {"sid": stream_id, "b_text": text, "b_mstatus": MESSAGE_STATUS[status], "b_now": now,
         **{f"b_{name}": given.get(name) for name in _USAGE}},
    )  # fmt: skip
    db.commit()
    return True


def extend_final(db: Session, stream_id: str, text: str, layout: Layout) -> bool:
    """Bring an ended stream's stored text up to its log, which holds more (an append whose
    reply was lost, a writer that ended in SQL as it was being taken over): the log is
    what viewers saw, so it is the text. Only moves forward; False when nothing changed."""
    now = utcnow()
    res = db.execute(
        update(Stream)
        .where(Stream.id == stream_id, Stream.last_seq < len(layout) + 1)
        .where(Stream.status.not_in(ACTIVE_STREAM_STATUSES))
        .values(
            last_seq=len(layout) + 1, seq_layout=json.dumps(layout),
            content_hash=content_hash(text), updated_at=now,
        )
    )  # fmt: skip
    if res.rowcount == 0:  # type: ignore[attr-defined]
        db.rollback()
        return False
    _set_message(db, stream_id, content=text, updated_at=now)
    db.commit()
    return True


def reopen(db: Session, stream: Stream, layout: Layout, task_id: str) -> None:
    """Queue a finished stream again (admin retry); ``layout`` ends with the resumed marker."""
    now = utcnow()
    stream.status, stream.task_id = "queued", task_id
    stream.seq_layout, stream.last_seq = json.dumps(layout), len(layout)
    stream.error_code = stream.error_message = stream.end_reason = stream.notice = None
    stream.finished_at, stream.updated_at = None, now
    _set_message(db, stream.id, status="pending", updated_at=now)
    db.commit()


def _set_message(db: Session, stream_id: str, **values: Any) -> None:
    message_id = select(Stream.message_id).where(Stream.id == stream_id).scalar_subquery()
    db.execute(update(Message).where(Message.id == message_id).values(**values))


def events_from_sql(stream: Stream, content: str, after: int) -> list[Event]:
    """Rebuild the log's events with ``seq > after`` from SQL, boundaries and all."""
    events: list[Event] = []
    start = 0
    layout = load_layout(stream)
    for seq, item in enumerate(layout, start=1):
        if isinstance(item, int):
            if seq > after:
                events.append(Event(seq, CHUNK, text=content[start:item]))
            start = item
        elif seq > after:
            events.append(Event.from_entry(f"0-{seq}", {"t": item[0], "d": item[1]}))
    terminal = TERMINAL_FOR_STATUS.get(stream.status)
    seq = len(layout) + 1
    if terminal and seq > after:
        if terminal == "error":
            events.append(
                error_event(seq, stream.error_code or "failed", stream.error_message or "")
            )
        else:
            events.append(
                Event(seq, terminal, message_id=stream.message_id, reason=stream.end_reason or "")
            )
    return events


def chunk_count(stream: Stream) -> int:
    """The seq of the last event whose text the stored content includes."""
    return len(load_layout(stream))
