"""Moving a stream between states from outside its writer: cancel, retry, and the sweeper
that recovers streams whose worker died. Used by the web tier, the workers and the CLI."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from models import store
from models.chunklog import ChunkLog, LogState
from models.events import CANCELLED, ERROR, STATUS_FOR_TERMINAL, TERMINAL_TYPES, Event
from models.exceptions import IllegalTransition, StreamNotFound
from models.tables import (
    ACTIVE_STREAM_STATUSES,
    TERMINAL_STREAM_STATUSES,
    Message,
    Stream,
    utcnow,
)

log = logging.getLogger("relay.lifecycle")

# Sends the generate task for a stream with the given Celery task id.
Enqueue = Callable[[str, str], None]


def cancel(chunks: ChunkLog, db: Session, stream: Stream, stale_after_s: float) -> str:
    """Stop a stream: 'requested' (its live writer ends it), 'finalized' (ended here because
    nobody was writing it) or 'finished' (it had already ended)."""
    if stream.status in TERMINAL_STREAM_STATUSES:
        return "finished"
    result, attempt, last_seq = chunks.cancel(stream.id, stale_after_s)
    if result == "taken":
        # Like a writer: SQL first, so a viewer that sees `cancelled` finds the text stored.
        text, layout = chunks.text(stream.id, last_seq)
        store.finalize(db, stream.id, status="cancelled", text=text, layout=layout, attempt=None)
        chunks.append(stream.id, attempt, Event(last_seq + 1, CANCELLED))
        db.refresh(stream)
        result = "finalized"
    log.info("stream=%s cancel: %s", stream.id, result)
    return result


def retry(chunks: ChunkLog, db: Session, stream_id: str, enqueue: Enqueue) -> tuple[int, str]:
    """Run a new attempt of a failed or cancelled stream on the same stream ID; the answer
    continues after a ``resumed`` event. Returns (resumed seq, task id)."""
    stream = db.get(Stream, stream_id)
    if stream is None:
        raise StreamNotFound(f"no stream {stream_id!r}")
    if stream.status not in ("failed", "cancelled"):
        raise IllegalTransition(
            f"stream {stream_id} is {stream.status}; only failed or cancelled streams can be "
            + ("retried (cancel it first)" if stream.status != "done" else "retried")
        )
    if not chunks.exists(stream_id):  # the log expired: rebuild it from SQL first
        message = db.get(Message, stream.message_id)
        events = store.events_from_sql(stream, message.content if message else "", 0)
        chunks.reseed(stream_id, events, stream.status, stream.attempt)
    task_id = f"{stream_id}-retry{stream.attempt + 1}"
    result, seq, _attempt = chunks.reopen(stream_id, task_id)
    if result != "reopened":
        raise IllegalTransition(f"stream {stream_id} is not finished in the log ({result})")
    _text, layout = chunks.text(stream_id, seq)
    store.reopen(db, stream, layout, task_id)
    enqueue(stream_id, task_id)
    log.info("stream=%s retried as task %s from seq=%d", stream_id, task_id, seq)
    return seq, task_id


@dataclass
class SweepReport:
    requeued: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    sealed: list[str] = field(default_factory=list)


@dataclass
class Sweeper:
    """Find streams whose writer is gone and put them right.

    - active in SQL, writer's heartbeat stale (or queued too long, or Redis lost the state):
      send the task again; the new attempt continues from the last seq written;
    - active in SQL but ended in the log (a cancel ended it, SQL not yet told): copy the end
      to SQL;
    - ended in SQL but the log never got its terminal event (the writer died between the
      two writes): write the missing events from SQL.
    """

    chunks: ChunkLog
    sessions: sessionmaker[Session]
    enqueue: Enqueue
    stale_after_s: float
    queued_grace_s: float = 300.0

    def sweep(self) -> SweepReport:
        report = SweepReport()
        cutoff = utcnow() - timedelta(seconds=max(60.0, 4 * self.stale_after_s))
        with self.sessions() as db:
            streams = db.scalars(
                select(Stream).where(
                    or_(Stream.status.in_(ACTIVE_STREAM_STATUSES), Stream.finished_at >= cutoff)
                )
            ).all()
            if not streams:
                return report
            now_ms, states = self.chunks.states([s.id for s in streams])
            for stream, state in zip(streams, states, strict=True):
                self._check(db, stream, state, now_ms, report)
        return report

    def _check(
        self, db: Session, stream: Stream, state: LogState, now_ms: int, report: SweepReport
    ) -> None:
        if stream.status in ACTIVE_STREAM_STATUSES:
            if state.status in TERMINAL_STREAM_STATUSES:
                if self._repair_sql(db, stream, state.last_seq):
                    report.repaired.append(stream.id)
            elif self._looks_abandoned(state, now_ms) and self.chunks.mark_requeue(
                stream.id, self.stale_after_s, self.queued_grace_s
            ):
                task_id = state.task_id or stream.task_id or stream.id
                self.enqueue(stream.id, task_id)
                log.warning("stream=%s writer gone; task %s sent again", stream.id, task_id)
                report.requeued.append(stream.id)
        elif state.status == "running":
            message = db.get(Message, stream.message_id)
            last = self.chunks.last_seq(stream.id)
            events = store.events_from_sql(stream, message.content if message else "", last)
            if events and self.chunks.seal(stream.id, events, self.stale_after_s) == "sealed":
                log.warning("stream=%s end written to the log from SQL", stream.id)
                report.sealed.append(stream.id)

    def _looks_abandoned(self, state: LogState, now_ms: int) -> bool:
        """Worth asking ``mark_requeue`` (which decides, atomically): skip the streams whose
        writer beat recently or that were queued recently."""
        if state.status == "running" and state.heartbeat_ms is not None:
            return now_ms - state.heartbeat_ms >= self.stale_after_s * 1000
        if state.status == "queued" and state.queued_ms is not None:
            return now_ms - state.queued_ms >= self.queued_grace_s * 1000
        return True

    def _repair_sql(self, db: Session, stream: Stream, last_seq: int) -> bool:
        db.refresh(stream)  # the writer may have ended it in SQL since the sweep read it
        if stream.status not in ACTIVE_STREAM_STATUSES:
            return False
        terminal = self.chunks.read(stream.id, last_seq - 1, 1)
        if not terminal or terminal[0].type not in TERMINAL_TYPES:
            return False
        event: Event = terminal[0]
        text, layout = self.chunks.text(stream.id, event.seq - 1)
        error = store.ErrorInfo(**event.error) if event.type == ERROR else None
        store.finalize(
            db, stream.id, status=STATUS_FOR_TERMINAL[event.type], text=text, layout=layout,
            attempt=None, error=error,
        )  # fmt: skip
        log.warning("stream=%s SQL brought up to the log's end", stream.id)
        return True
