"""SQL writes and reads about a stream's progress, shared by workers and the web tier."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from models.events import CHUNK, TERMINAL_FOR_STATUS, Event, error_event
from models.tables import Message, Stream, utcnow

MESSAGE_STATUS = {"done": "complete", "cancelled": "cancelled", "failed": "failed"}


@dataclass(frozen=True)
class ErrorInfo:
    code: str
    message: str


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def mark_running(db: Session, stream_id: str, attempt: int, task_id: str) -> None:
    """Record that ``attempt`` (run by ``task_id``) now writes the stream."""
    now = utcnow()
    stream = db.get(Stream, stream_id)
    if stream is None:
        return
    stream.status, stream.attempt, stream.task_id = "running", attempt, task_id
    stream.started_at = stream.started_at or now
    stream.updated_at = now
    db.execute(update(Message).where(Message.id == stream.message_id).values(status="streaming"))
    db.commit()


def checkpoint(db: Session, stream_id: str, attempt: int, text: str, ends: list[int]) -> bool:
    """Copy the partial answer to SQL; False when another attempt owns the stream."""
    now = utcnow()
    res = db.execute(
        update(Stream)
        .where(Stream.id == stream_id, Stream.attempt == attempt, Stream.status == "running")
        .values(last_seq=len(ends), chunk_ends=json.dumps(ends), updated_at=now)
    )
    if res.rowcount == 0:  # type: ignore[attr-defined]
        db.rollback()
        return False
    message_id = db.scalar(select(Stream.message_id).where(Stream.id == stream_id))
    db.execute(update(Message).where(Message.id == message_id).values(content=text, updated_at=now))
    db.commit()
    return True


def finalize(
    db: Session,
    stream_id: str,
    *,
    status: str,
    text: str,
    ends: list[int],
    seq: int,
    attempt: int | None,
    error: ErrorInfo | None = None,
) -> bool:
    """Store the final text and status; with ``attempt``, only if that attempt still owns it."""
    now = utcnow()
    stmt = update(Stream).where(Stream.id == stream_id)
    if attempt is not None:
        stmt = stmt.where(Stream.attempt == attempt)
    res = db.execute(
        stmt.values(
            status=status,
            last_seq=seq,
            chunk_ends=json.dumps(ends),
            content_hash=content_hash(text),
            error_code=error.code if error else None,
            error_message=error.message if error else None,
            finished_at=now,
            updated_at=now,
        )
    )
    if res.rowcount == 0:  # type: ignore[attr-defined]
        db.rollback()
        return False
    message_id = db.scalar(select(Stream.message_id).where(Stream.id == stream_id))
    db.execute(
        update(Message)
        .where(Message.id == message_id)
        .values(content=text, status=MESSAGE_STATUS[status], updated_at=now)
    )
    db.commit()
    return True


def events_from_sql(stream: Stream, content: str, after: int) -> list[Event]:
    """Rebuild the log's events with ``seq > after`` from SQL, boundaries and all."""
    events: list[Event] = []
    start = 0
    ends: list[int] = json.loads(stream.chunk_ends or "[]")
    for seq, end in enumerate(ends, start=1):
        if seq > after:
            events.append(Event(seq, CHUNK, text=content[start:end]))
        start = end
    terminal = TERMINAL_FOR_STATUS.get(stream.status)
    seq = len(ends) + 1
    if terminal and seq > after:
        if terminal == "error":
            events.append(
                error_event(seq, stream.error_code or "failed", stream.error_message or "")
            )
        else:
            events.append(Event(seq, terminal, message_id=stream.message_id))
    return events


def chunk_count(stream: Stream) -> int:
    """How many chunks of the stream the stored message content holds."""
    ends: list[int] = json.loads(stream.chunk_ends or "[]")
    return len(ends)
