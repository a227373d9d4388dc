"""Moving a stream between states from outside its writer: cancel, retry, and the sweeper
that recovers streams whose worker died. Used by the web tier, the workers and the CLI."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, NamedTuple

from sqlalchemy import delete, or_, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from models import feed, store
from models.chunklog import (
    REQUEUE_OVER_BUDGET,
    REQUEUE_SEND,
    ChunkLog,
    LogState,
    resend_wait,
)
from models.db import OUTAGE_ERRORS, is_lock_conflict
from models.events import (
    ERROR,
    STATUS_FOR_TERMINAL,
    TERMINAL_FOR_STATUS,
    TERMINAL_TYPES,
    Event,
    error_event,
)
from models.exceptions import IllegalTransition, StreamNotFound
from models.tables import (
    ACTIVE_STREAM_STATUSES,
    TERMINAL_STREAM_STATUSES,
    Chat,
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
        ended = end_taken(chunks, db, stream.id, attempt, last_seq, "cancelled")
        result = "finalized" if ended else "finished"
        db.refresh(stream)
    log.info("stream=%s cancel: %s", stream.id, result)
    return result


def end_taken(
    chunks: ChunkLog,
    db: Session,
    stream_id: str,
    attempt: int,
    last_seq: int,
    status: str,
    error: store.ErrorInfo | None = None,
    usage: dict[str, Any] | None = None,
    reason: str | None = None,
) -> bool:
    """End a stream the caller took over as ``attempt`` (``ChunkLog.take_over``), like a
    writer would: SQL first, fenced by the same attempt (so the writer that was taken over
    can no longer end it there), then the terminal event. If SQL had already ended it (that
    writer finished just before it was taken over), the log ends the way SQL did instead:
    the two stores never end differently. True when this call decided the end."""
    text, layout = chunks.text(stream_id, last_seq)
    if store.finalize(
        db, stream_id, status=status, text=text, layout=layout, attempt=attempt,
        takeover=True, error=error, usage=usage, reason=reason,
    ):  # fmt: skip
        if error is not None:
            terminal = error_event(last_seq + 1, error.code, error.message)
        else:
            message_id = str(db.scalar(select(Stream.message_id).where(Stream.id == stream_id)))
            terminal = Event(last_seq + 1, TERMINAL_FOR_STATUS[status], message_id=message_id,
                             reason=reason or "")  # fmt: skip
        chunks.append(stream_id, attempt, terminal)
        feed.publish_answer(chunks, db, stream_id, feed.ANSWER_FINISHED, status, reason)
        return True
    stream = db.get(Stream, stream_id)
    if stream is not None:
        db.refresh(stream)
        if stream.status in TERMINAL_STREAM_STATUSES:
            seal_from_sql(chunks, db, stream, 0)  # the log is ours: no live writer to wait for
    return False


def seal_from_sql(chunks: ChunkLog, db: Session, stream: Stream, stale_after_s: float) -> str:
    """Write the end SQL stored into a log whose writer is gone ('sealed', 'busy',
    'finished', 'moved'). The terminal event always lands at the log's last seq + 1: when
    the log holds more than SQL (it is what viewers saw), SQL's text is brought up to it
    first; when it holds less (it lost entries), SQL's missing events are written first."""
    now_ms, (state,) = chunks.states([stream.id])
    if state.status in TERMINAL_STREAM_STATUSES:
        return "finished"  # its writer ended it since the caller looked
    beat = state.heartbeat_ms
    if state.status == "running" and beat and now_ms - beat < stale_after_s * 1000:
        return "busy"  # a live writer (it may be about to write its terminal event)
    message = db.get(Message, stream.message_id)
    content = message.content if message else ""
    last = chunks.last_seq(stream.id)
    if last and chunks.read(stream.id, last - 1, 1)[0].type in TERMINAL_TYPES:
        return "finished"
    if last >= store.chunk_count(stream) + 1:  # the log is ahead of SQL
        text, layout = chunks.text(stream.id, last)
        if store.extend_final(db, stream.id, text, layout):
            log.warning("stream=%s SQL's text brought up to the log (seq %d)", stream.id, last)
        db.refresh(stream)
        content = text
    events = store.events_from_sql(stream, content, last)
    if not events:
        return "finished"
    result = chunks.seal(stream.id, events, stale_after_s)
    if result == "sealed":  # the end SQL stored reaches the log, and its viewers, now
        feed.publish_answer(
            chunks, db, stream.id, feed.ANSWER_FINISHED, stream.status, stream.end_reason
        )
    return result


DELETE_ATTEMPTS = 5  # a deletion that met lock conflicts this many times fails


def delete_chats(chunks: ChunkLog, db: Session, chat_ids: Sequence[str]) -> int:
    """Delete chats with their messages, streams and Redis logs; return how many. Removing a
    running answer's Redis state fences its writer off: its next append or heartbeat finds
    no attempt it owns, so it stops (and closes its upstream: no more tokens paid for); a
    queued answer's task finds no stream and is dropped. SQL's rows go last, so a failure
    half-way leaves the chats, with logs SQL can rebuild. The logs are removed once more
    after the commit: a sweep that read the rows before it may have written a state in
    between (see ``Sweeper._forget_if_deleted`` for one that writes after)."""
    if not chat_ids:
        return 0
    stream_ids = db.scalars(select(Stream.id).where(Stream.chat_id.in_(chat_ids))).all()
    chunks.forget(stream_ids)
    # The cascade locks the chats' messages, then their streams; a writer ending one of
    # those answers at that moment locks them the other way round. PostgreSQL then aborts
    # one of the two transactions (a deadlock): when it is this one, it is done again.
    for attempt in range(1, DELETE_ATTEMPTS + 1):
        try:
            result = db.execute(delete(Chat).where(Chat.id.in_(chat_ids)))
            db.commit()
            break
        except OperationalError as exc:
            db.rollback()
            if attempt == DELETE_ATTEMPTS or not is_lock_conflict(exc):
                raise
            log.warning("deleting chats met a lock conflict (%s); again", exc.orig)
            time.sleep(0.05 * attempt)
    chunks.forget(stream_ids)
    deleted = int(result.rowcount)  # type: ignore[attr-defined]
    log.info("deleted %d chat(s) and %d stream(s)", deleted, len(stream_ids))
    return deleted


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
    result, seq, _attempt = chunks.reopen(stream_id, task_id, stream.detach_after_s)
    if result != "reopened":
        raise IllegalTransition(f"stream {stream_id} is not finished in the log ({result})")
    _text, layout = chunks.text(stream_id, seq)
    store.reopen(db, stream, layout, task_id)
    enqueue(stream_id, task_id)
    chunks.mark_sent(stream_id)
    feed.publish_answer(chunks, db, stream_id, feed.ANSWER_QUEUED)
    log.info("stream=%s retried as task %s from seq=%d", stream_id, task_id, seq)
    return seq, task_id


@dataclass
class SweepReport:
    requeued: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    sealed: list[str] = field(default_factory=list)
    exhausted: list[str] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)
    checked: int = 0


class _Row(NamedTuple):
    """What the sweeper reads of every candidate stream (no text, no layout)."""

    id: str
    status: str
    task_id: str | None


_CANDIDATE_COLUMNS = (Stream.id, Stream.status, Stream.task_id)


def hand_back() -> None:
    """Let the process's other work run. Under gevent: a turn of the event loop that polls
    for I/O and runs due timers (``sleep(0)`` only switches to the greenlets already ready,
    and may come straight back without a poll in between)."""
    time.sleep(0.0001)


TOO_MANY_ATTEMPTS = "too_many_attempts"


@dataclass
class Sweeper:
    """Find streams whose writer is gone and put them right.

    - active in SQL, writer's heartbeat stale (or queued too long, or committed but never
      sent, or the log has had no state for it for the stale period): send the task again,
      unless a copy sent earlier may still be waiting in the queue; the new attempt continues
      from the last seq written;
    - the same, past the attempt budget (claims, recovery sends and hand-offs): end it
      ``failed`` with ``too_many_attempts``, keeping its text;
    - a writer that generated the whole answer but found SQL unreachable past the budget
      left the end in the log's state: store it in SQL, then write the terminal event;
    - active in SQL but ended in the log (a cancel ended it, SQL not yet told): copy the end
      to SQL;
    - ended in SQL but the log never got its terminal event (the writer died between the
      two writes): write the end into the log, at the log's last seq + 1.

    The state reads of a pass are pipelined in batches; only the streams that need an action
    are loaded in full. A pass shares its process with the answers a worker is writing
    (under gevent, one event loop): it hands the loop back (``pause``) after every page of
    rows it reads and every batch it checks, so it holds the loop for a few milliseconds at
    a time, not for the whole pass (tens of milliseconds per thousand candidates).
    """

    chunks: ChunkLog
    sessions: sessionmaker[Session]
    enqueue: Enqueue
    stale_after_s: float
    queued_grace_s: float = 300.0
    max_attempts: int = 5
    batch: int = 200
    # Rows read from SQL between two pauses.
    page: int = 500
    pause: Callable[[], None] = hand_back
    # How long a recovery copy may go unclaimed before another is sent (None: resend_wait).
    resend_wait_s: float | None = None

    def sweep(self, keep_going: Callable[[], bool] = lambda: True) -> SweepReport:
        """One pass; ``keep_going`` is asked between batches (the caller's lock)."""
        report = SweepReport()
        cutoff = utcnow() - timedelta(seconds=max(60.0, 4 * self.stale_after_s))
        with self.sessions() as db:
            candidates = select(*_CANDIDATE_COLUMNS).where(
                or_(Stream.status.in_(ACTIVE_STREAM_STATUSES), Stream.finished_at >= cutoff)
            )
            rows: list[_Row] = []
            pages = db.execute(candidates, execution_options={"yield_per": self.page})
            for page in pages.partitions():
                rows.extend(_Row(*r) for r in page)
                self.pause()
            db.rollback()  # no transaction held open through the pass
            for start in range(0, len(rows), self.batch):
                if start and not keep_going():
                    log.warning("sweep stopped after %d of %d streams: lock lost", start, len(rows))
                    break
                chunk = rows[start : start + self.batch]
                now_ms, states = self.chunks.states([r.id for r in chunk])
                for row, state in zip(chunk, states, strict=True):
                    self._check(db, row, state, now_ms, report)
                report.checked += len(chunk)
                self.pause()
        return report

    def _check(
        self, db: Session, row: _Row, state: LogState, now_ms: int, report: SweepReport
    ) -> None:
        if row.status in ACTIVE_STREAM_STATUSES:
            if state.status in TERMINAL_STREAM_STATUSES:
                if self._repair_sql(db, row.id, state.last_seq):
                    report.repaired.append(row.id)
            elif state.pending_end is not None and self._end_pending(db, row.id, state):
                report.ended.append(row.id)
            elif self._looks_abandoned(state, now_ms):
                self._resend(db, row, state, report)
        elif state.status == "running":
            stream = db.get(Stream, row.id)
            if stream is not None and seal_from_sql(
                self.chunks, db, stream, self.stale_after_s
            ) == "sealed":  # fmt: skip
                if self._forget_if_deleted(db, row.id):
                    return
                log.warning("stream=%s end written to the log from SQL", row.id)
                report.sealed.append(row.id)

    def _resend(self, db: Session, row: _Row, state: LogState, report: SweepReport) -> None:
        decision = self.chunks.mark_requeue(
            row.id, self.stale_after_s, self.queued_grace_s, self.max_attempts,
            resend_wait_s=self._resend_wait_s(),
        )  # fmt: skip
        if state.status is None and self._forget_if_deleted(db, row.id):
            return  # the script wrote a state for a stream whose chat was being deleted
        if decision == REQUEUE_SEND:
            task_id = state.task_id or row.task_id or row.id
            try:
                self.enqueue(row.id, task_id)
            except Exception:
                self.chunks.forget_send(row.id)  # never sent: the next pass tries again
                raise
            log.warning("stream=%s writer gone; task %s sent again", row.id, task_id)
            report.requeued.append(row.id)
        elif decision == REQUEUE_OVER_BUDGET and self._end_over_budget(db, row.id):
            report.exhausted.append(row.id)

    def _forget_if_deleted(self, db: Session, stream_id: str) -> bool:
        """The pass read this stream's row before a deletion committed and has just written
        its log (a seal, or the time a stream without state was first seen): remove what it
        wrote if the row is gone now. A deletion removes the logs before and after its
        commit, so whichever way the two interleave, nothing of a deleted chat is left."""
        db.rollback()  # a fresh snapshot (SQLite keeps a transaction's first one)
        if db.scalar(select(Stream.id).where(Stream.id == stream_id)) is not None:
            return False
        self.chunks.forget([stream_id])
        log.info("stream=%s deleted during the sweep; its log removed", stream_id)
        return True

    def _end_pending(self, db: Session, stream_id: str, state: LogState) -> bool:
        """A writer generated the whole answer but could not store its end in SQL (it was
        unreachable past the budget): store it now, then write the terminal event."""
        end = state.pending_end or {}
        result, attempt, last_seq = self.chunks.take_over(stream_id, self.stale_after_s)
        if result != "taken":
            return False
        error = store.ErrorInfo(**end["error"]) if end.get("error") else None
        try:
            end_taken(
                self.chunks, db, stream_id, attempt, last_seq, end["status"], error,
                end.get("usage"), end.get("reason"),
            )  # fmt: skip
        except OUTAGE_ERRORS:
            # SQL reads but refuses the write (locked, restarting): the take-over removed the
            # end from the log's state, so put it back (as the attempt just taken, with a
            # stale heartbeat) for the next pass, instead of leaving a finished answer to be
            # sent to a worker again.
            self.chunks.pend_end(
                stream_id, attempt, end["status"], end.get("error"), end.get("usage"),
                end.get("reason"),
            )  # fmt: skip
            raise
        log.warning("stream=%s the end its writer left (%s) stored", stream_id, end["status"])
        return True

    def _end_over_budget(self, db: Session, stream_id: str) -> bool:
        result, attempt, last_seq = self.chunks.take_over(stream_id, self.stale_after_s)
        if result != "taken":
            return False
        error = store.ErrorInfo(
            TOO_MANY_ATTEMPTS,
            f"the answer was started {self.max_attempts} times, or sent as often without a "
            "worker taking it, without finishing; "
            "retry it to try again",
        )
        end_taken(self.chunks, db, stream_id, attempt, last_seq, "failed", error)
        log.warning("stream=%s ended: attempt budget (%d) spent", stream_id, self.max_attempts)
        return True

    def _looks_abandoned(self, state: LogState, now_ms: int) -> bool:
        """Worth asking ``mark_requeue`` (which decides, atomically): skip the streams whose
        writer beat recently or that were queued recently. A stream the log has no state for
        is always asked about: the script times its absence from the first sweep that saw it
        (the SQL row's age is not the log's: its commit may have waited for a lock)."""
        beat_ms = state.heartbeat_ms
        if state.status == "running" and beat_ms and now_ms - beat_ms < self.stale_after_s * 1000:
            return False
        if state.resent_ms is not None:  # a copy may still wait: back off (see mark_requeue)
            wait_s = self._resend_wait_s() * 2.0 ** max(0, state.resends - 1)
            return now_ms - state.resent_ms >= wait_s * 1000
        if state.status == "running":
            return True
        if state.status == "queued" and state.queued_ms is not None:
            grace_s = self.queued_grace_s if state.sent else self.stale_after_s
            return now_ms - state.queued_ms >= grace_s * 1000
        # No state (status None): the script measures how long the log has had none.
        return True

    def _resend_wait_s(self) -> float:
        return resend_wait(self.stale_after_s) if self.resend_wait_s is None else self.resend_wait_s

    def _repair_sql(self, db: Session, stream_id: str, last_seq: int) -> bool:
        terminal = self.chunks.read(stream_id, last_seq - 1, 1)
        if not terminal or terminal[0].type not in TERMINAL_TYPES:
            return False
        event: Event = terminal[0]
        text, layout = self.chunks.text(stream_id, event.seq - 1)
        error = store.ErrorInfo(**event.error) if event.type == ERROR else None
        if not store.finalize(
            db, stream_id, status=STATUS_FOR_TERMINAL[event.type], text=text, layout=layout,
            attempt=None, error=error,
        ):  # fmt: skip
            return False  # the writer ended it in SQL since the sweep read it
        log.warning("stream=%s SQL brought up to the log's end", stream_id)
        return True
