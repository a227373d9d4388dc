"""Run one attempt of a generation: claim the stream, write every piece to the log, finish.

Plain functions and a small writer class; ``workers.tasks`` is the thin Celery wrapper.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import bindparam, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from models import feed, lifecycle, store
from models.chunklog import Claim
from models.db import OUTAGE_ERRORS
from models.events import ABANDONED, CHUNK, TERMINAL_FOR_STATUS, Event, error_event
from models.exceptions import GenerationError, LogUnavailable, StaleAttempt
from models.lifecycle import TOO_MANY_ATTEMPTS
from models.redisconn import OUTAGES
from models.tables import TERMINAL_STREAM_STATUSES, Chat, Message, Stream
from ops.geventfix import start_background
from workers.generators import GenerationRequest, Turn
from workers.runtime import WorkerRuntime

log = logging.getLogger("relay.worker")

SURROGATE = re.compile("[\ud800-\udfff]")


class StorableText:
    """A model's pieces made storable: Redis (UTF-8) and PostgreSQL refuse a lone surrogate,
    PostgreSQL a NUL, and a model can send either (a JSON ``\\u0000`` or ``\\ud800``). Each
    becomes U+FFFD; a surrogate pair split across two pieces is joined, not replaced."""

    def __init__(self) -> None:
        self.held = ""  # a high surrogate that ended the last piece: its pair may come next

    def clean(self, piece: str) -> str:
        text, self.held = self.held + piece, ""
        if text and "\ud800" <= text[-1] <= "\udbff":
            text, self.held = text[:-1], text[-1]
        if "\x00" in text:
            text = text.replace("\x00", "\ufffd")
        if SURROGATE.search(text):  # pairs joined through UTF-16, what is left replaced
            text = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
            text = SURROGATE.sub("\ufffd", text)
        return text

    def rest(self) -> str:
        """What is still held at the end of the answer: a high surrogate with no pair."""
        held, self.held = self.held, ""
        return "\ufffd" if held else ""


T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    stream_id: str
    message_id: str
    status: str
    history: tuple[Turn, ...]
    model: str | None = None
    attempt: int = 0
    detach_after_s: int | None = None  # the detach policy (None: continue)
    user_id: str = ""  # the chat's owner, and the chat (for the owner's feed)
    chat_id: str = ""

    def announce(self, rt: WorkerRuntime, kind: str, **fields: str | None) -> News:
        """An ``answer.*`` event on its way to the owner's feed (``wait`` for it)."""
        event = feed.event_of(kind, chatId=self.chat_id, streamId=self.stream_id,
                              messageId=self.message_id, **fields)  # fmt: skip
        return News(rt, self.user_id, event)


class News:
    """A feed event that rides the appender's next round trip (``GroupAppender.ride``): no
    pool connection or round trip of its own, so answers that end together cost one
    pipeline, not a connection each. If the ride fails (its connection lost: it may have
    run; a script Redis forgot; the flusher busy past the timeout), ``wait`` publishes it
    the ordinary way: the feed may repeat an event, as redis-py's own retry can, but does
    not miss one that was waited for. Never raises."""

    def __init__(self, rt: WorkerRuntime, user_id: str, event: dict[str, Any]) -> None:
        self.rt = rt
        self.user_id = user_id
        self.event = event
        self.ride = rt.appender.ride(feed.Feed(rt.log.redis).append_command(user_id, event))

    def wait(self, timeout: float = 10.0) -> None:
        try:
            self.ride.result(timeout)
        except Exception as exc:
            log.info("feed user=%s %s: sending it again alone (%s)", self.user_id,
                     self.event["type"], type(exc).__name__)  # fmt: skip
            feed.publish_events(self.rt, self.user_id, [self.event])


class HandedOff(Exception):
    """The worker is shutting down: the stream was released for another worker."""


# Built once and run on the session's connection: this is on the path from a post to its
# first chunk, where building the statements and the ORM's execution path cost four times
# the two queries themselves.
_JOB = (
    select(Stream.message_id, Stream.chat_id, Stream.status, Stream.attempt,
           Message.position, Message.model, Stream.detach_after_s, Chat.user_id)
    .join(Message, Message.id == Stream.message_id)
    .join(Chat, Chat.id == Stream.chat_id)
    .where(Stream.id == bindparam("sid"))
)  # fmt: skip
_HISTORY = (
    select(Message.role, Message.content)
    .where(Message.chat_id == bindparam("cid"), Message.position < bindparam("position"))
    .order_by(Message.position)
)


def load_job(rt: WorkerRuntime, stream_id: str) -> Job | None:
    """Load the stream and the conversation before its answer (two plain queries, on a Core
    connection). They read without a transaction (autocommit): on PostgreSQL a transaction
    costs a BEGIN and a ROLLBACK, two of the five round trips this read made on the path
    from a post to its first chunk; the turns before the answer's position do not change."""
    with rt.connect() as plain:
        conn = plain.execution_options(isolation_level="AUTOCOMMIT")
        row = conn.execute(_JOB, {"sid": stream_id}).first()
        if row is None:
            return None
        message_id, chat_id, status, attempt, position, model, detach_after_s, user_id = row
        turns = conn.execute(_HISTORY, {"cid": chat_id, "position": position})
        history = tuple(Turn(role, content) for role, content in turns if content)
        return Job(stream_id, message_id, status, history, model, attempt, detach_after_s,
                   user_id, chat_id)  # fmt: skip


def ride_out(rt: WorkerRuntime, stream_id: str, what: str, call: Callable[[], T]) -> T:
    """``call()``, tried again with backoff while Redis or SQL is unreachable (a restart),
    for up to RELAY_BACKEND_BUDGET_S; then the error. Before the claim a task holds its
    message: a Celery retry would have to publish to the broker that is down (and Celery
    drops a task whose retry it cannot publish)."""
    started, delay = time.monotonic(), 0.25
    while True:
        try:
            return call()
        except OUTAGES as exc:
            if time.monotonic() - started + delay > rt.settings.backend_budget_s:
                raise
            if delay == 0.25:
                log.warning("stream=%s %s: %s; trying again", stream_id, what,
                            type(exc).__name__)  # fmt: skip
            time.sleep(delay)
            delay = min(delay * 2, 4.0)


def run_generation(rt: WorkerRuntime, stream_id: str, task_id: str) -> str:
    """Run one attempt; return what happened (done, cancelled, failed, busy, ...)."""
    job = ride_out(rt, stream_id, "loading", lambda: load_job(rt, stream_id))
    if job is None:
        log.warning("stream=%s not found; dropping task %s", stream_id, task_id)
        return "missing"
    if job.status in TERMINAL_STREAM_STATUSES:
        return "finished"
    if rt.shutdown.begun:
        # Celery's consumer polls on for up to 2 s after a SIGTERM, so a stopping worker can
        # receive a task, even the one it just handed back: pass it on unclaimed (a claim
        # would count against the stream's attempt budget), after a pause so the copy is not
        # fetched again by this worker in a tight loop.
        time.sleep(0.25)
        rt.enqueue(stream_id, task_id)
        log.info("stream=%s task=%s passed on: this worker is stopping", stream_id, task_id)
        return "passed-on"
    claim = ride_out(rt, stream_id, "claiming", lambda: rt.log.claim(
        stream_id, task_id, rt.settings.heartbeat_stale_s, rt.worker_name, job.attempt,
        detach=job.detach_after_s is not None,
    ))  # fmt: skip
    if claim.result != "claimed":
        log.info("stream=%s task=%s not started: %s", stream_id, task_id, claim.result)
        return claim.result
    log.info("stream=%s attempt=%d task=%s from seq=%d", stream_id, claim.attempt, task_id,
             claim.last_seq)  # fmt: skip
    return run_attempt(rt, job, claim, task_id)


def run_attempt(rt: WorkerRuntime, job: Job, claim: Claim, task_id: str) -> str:
    """Run a claimed attempt to its end (or hand it back, or step aside)."""
    stream_id = job.stream_id
    writer = LogWriter(rt, job, claim.attempt, claim.last_seq, task_id)
    writer.running = RunningMark(rt, job, claim, task_id)
    try:
        with watch(rt, writer):
            return writer.begin(claim)
    except NotStarted as exc:
        return _not_started(rt, stream_id, claim.attempt, exc)
    except StaleAttempt:
        log.warning("stream=%s attempt=%d was superseded; stopping", stream_id, claim.attempt)
        return "superseded"
    except HandedOff:
        writer.settle()  # what was handed to the log is in it before another worker reads it
        # Marked as a recovery send first, so the sweeper does not send a second copy.
        rt.log.release(stream_id, claim.attempt)
        rt.enqueue(stream_id, task_id)
        log.warning("stream=%s attempt=%d handed back for another worker", stream_id,
                    claim.attempt)  # fmt: skip
        return "handed-off"
    except BaseException:
        if not rt.is_revoked(task_id):
            raise
        # `celery control terminate` kills the task (the gevent pool raises GreenletExit in
        # it): end the stream now as the revoke asked, rather than leave it to the sweeper.
        log.warning("stream=%s attempt=%d terminated; ending it cancelled", stream_id,
                    claim.attempt)  # fmt: skip
        writer.settle()
        try:
            return writer.finish("cancelled")
        except NotStarted as exc:
            return _not_started(rt, stream_id, claim.attempt, exc)


def _not_started(rt: WorkerRuntime, stream_id: str, attempt: int, exc: NotStarted) -> str:
    if exc.cause is not None:  # SQL stayed unreachable: Celery tries the task again later
        raise exc.cause from None
    with rt.sessions() as db:
        return _claim_void(rt, db, stream_id, attempt)


class NotStarted(Exception):
    """SQL did not record the attempt as running: the claim was void (``cause`` None: SQL
    ended the stream, or a later attempt owns it), or SQL stayed unreachable (``cause``)."""

    def __init__(self, cause: BaseException | None = None) -> None:
        super().__init__("the attempt was not recorded as running")
        self.cause = cause


class RunningMark:
    """SQL's ``running`` write for a claimed attempt, made while the upstream request is out.

    Nothing the model is asked depends on it, and it is on the path from a post to its
    first chunk (0.25-0.5 ms on SQLite, a round trip and a commit on PostgreSQL). So it runs
    in the background: under gevent it begins at the task's first wait, which is the
    upstream's reply (nothing between the claim and the request yields), and otherwise in a
    thread. The writer waits for it (``confirm``) before anything of the attempt reaches the
    log or SQL: the first piece, a checkpoint, the end. A void claim costs a request, closed
    at its first piece."""

    def __init__(self, rt: WorkerRuntime, job: Job, claim: Claim, task_id: str) -> None:
        self.rt, self.job, self.claim, self.task_id = rt, job, claim, task_id
        self.done = threading.Event()
        self.ok = False
        self.error: BaseException | None = None
        self.news: News | None = None  # the feed's "answer.started", once SQL has it running
        start_background(self._run, f"running-{job.stream_id[:8]}")

    def _run(self) -> None:
        try:
            self.rt.fault("before-running")
            self.ok = ride_out(self.rt, self.job.stream_id, "starting", self._write)
            if self.ok:
                # With the appender's next round trip (no pool connection of its own); the
                # end waits for it, so the owner's feed has "started" before "finished".
                self.news = self.job.announce(self.rt, feed.ANSWER_STARTED)
        except BaseException as exc:  # handed to whoever confirms
            self.error = exc
        finally:
            self.done.set()

    def _write(self) -> bool:
        job = self.job
        with self.rt.connect() as conn:
            writer = store.fenced_writer(conn)
            return store.mark_running(writer, job.stream_id, job.message_id,
                                      self.claim.attempt, self.task_id)  # fmt: skip

    def confirm(self) -> None:
        """Wait for the write; NotStarted unless SQL now has this attempt running."""
        self.done.wait()
        if self.error is not None or not self.ok:
            raise NotStarted(self.error)


def _claim_void(rt: WorkerRuntime, db: Session, stream_id: str, attempt: int) -> str:
    """SQL ended the stream (or a later attempt owns it) while the log let us claim it: the
    log follows SQL's end now, rather than leave a live-looking log to the sweeper."""
    stream = db.get(Stream, stream_id)
    if stream is None or stream.status not in TERMINAL_STREAM_STATUSES:
        log.warning("stream=%s attempt=%d superseded in SQL; stopping", stream_id, attempt)
        return "superseded"
    result = lifecycle.seal_from_sql(rt.log, db, stream, 0)
    log.warning("stream=%s already ended %s in SQL; log %s", stream_id, stream.status, result)
    return "finished"


# Each interval between two checkpoints of an answer is 1 - CHECKPOINT_JITTER to 1 times
# RELAY_CHECKPOINT_INTERVAL_S, at random.
CHECKPOINT_JITTER = 0.2


@dataclass
class SqlOutage:
    """How long SQL has been unreachable for one writer, and how long to wait before the
    next try (the checkpoint interval while it answers; doubling up to 8 s while down)."""

    interval_s: float
    down_since: float | None = None
    wait_s: float = 0.0

    def __post_init__(self) -> None:
        self.wait_s = self.interval_s

    def failed(self, stream_id: str, what: str, exc: Exception) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("stream=%s %s: the database is unreachable (%s); the answer goes on "
                        "in the log", stream_id, what, type(exc).__name__)  # fmt: skip
        self.wait_s = min(max(self.wait_s * 2, 0.25), 8.0)

    def answered(self, stream_id: str) -> None:
        if self.down_since is not None:
            log.warning("stream=%s the database answers again after %.1fs", stream_id,
                        self.down_for())  # fmt: skip
            self.down_since = None
        self.wait_s = self.interval_s

    def down_for(self) -> float:
        return 0.0 if self.down_since is None else time.monotonic() - self.down_since

    def backoff(self) -> float:
        return min(self.wait_s, 2.0)


class LogWriter:
    """Append one attempt's pieces to the log and keep SQL in step."""

    def __init__(
        self, rt: WorkerRuntime, job: Job, attempt: int, last_seq: int, task_id: str
    ) -> None:
        self.rt = rt
        self.job = job
        self.attempt = attempt
        self.task_id = task_id
        self.next_seq = last_seq + 1
        self.appender = rt.appender.open(job.stream_id, attempt, last_seq)
        text, self.layout = rt.log.text(job.stream_id, last_seq) if last_seq else ("", [])
        # Pieces kept in a list (joined at checkpoints): `str +=` on an attribute copies the
        # whole answer on every append.
        self.parts = [text] if text else []
        self.length = len(text)
        # What this writer's last checkpoint stored (None: unknown, write the answer whole):
        # the number of parts and of layout items it covered.
        self.saved: tuple[int, int] | None = None
        self.started = time.monotonic()
        interval = rt.settings.checkpoint_interval_s
        self.checkpointed_at = self.started  # the clock starts at the first piece (below)
        self.handoff = threading.Event()  # set by the watcher when the worker shuts down
        self.timed_out = threading.Event()  # set by the watcher past max_generation_s
        self.first_chunk_at: float | None = None
        self.sql = SqlOutage(interval)
        self.request = GenerationRequest(job.stream_id, job.history, partial=text, model=job.model)
        self.started_news: News | None = None  # the feed's "answer.started"
        self.running: RunningMark | None = None  # SQL's running write, until confirmed

    def confirm_running(self) -> None:
        """Before the attempt's first write to the log or SQL: SQL has it running."""
        if self.running is not None:
            running, self.running = self.running, None
            running.confirm()
            self.started_news = running.news

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def begin(self, claim: Claim) -> str:
        """Run the attempt, unless a cancel is pending or the attempt budget is spent."""
        if claim.cancel_requested:
            return self.finish("cancelled")
        budget = self.rt.settings.max_attempts
        if claim.tries > budget:
            return self.fail(
                TOO_MANY_ATTEMPTS,
                f"the answer was started {claim.tries - 1} times without finishing "
                f"(RELAY_MAX_ATTEMPTS={budget}); retry it to try again",
            )
        return self.run()

    def run(self) -> str:
        generator = self.rt.generator
        if self.text and not generator.supports_continuation:
            return self.fail(
                "cannot_continue",
                f"the worker running this answer stopped, and the {generator.name} generator "
                "cannot continue a partial answer; retry to start it again",
            )
        try:
            with closing(generator.generate(self.request)) as pieces:
                cancelled = self.write_all(pieces)
        except (StaleAttempt, HandedOff, NotStarted):
            raise
        except LogUnavailable as exc:  # an outage past the budget, not the generator's fault
            log.warning("stream=%s log unavailable: %s", self.job.stream_id, exc)
            return self.fail("backend_unavailable", str(exc))
        except Exception as exc:
            if self.request.abort.requested:  # the watcher closed the upstream on purpose
                return self.after_abort()
            if isinstance(exc, GenerationError):
                log.warning("stream=%s generator failed: %s", self.job.stream_id, exc)
                return self.fail(exc.code, str(exc))
            log.exception("stream=%s generator crashed", self.job.stream_id)
            return self.fail("generation_failed", f"the generator failed ({type(exc).__name__})")
        if cancelled:
            return self.finish("cancelled")
        if self.request.abort.requested:
            return self.after_abort()
        return self.finish("done")

    def after_abort(self) -> str:
        """The generator was stopped from the watcher: say why."""
        if self.handoff.is_set():
            raise HandedOff(self.job.stream_id)
        if self.timed_out.is_set():
            limit = self.rt.settings.max_generation_s
            return self.fail("timeout", f"the answer took longer than {limit:.0f}s")
        return self.finish("cancelled")

    def write_all(self, pieces: Generator[str, None, None]) -> bool:
        """Hand every piece to the log; return True when a cancel was requested."""
        limit = self.rt.settings.max_generation_s
        storable = StorableText()
        for raw in pieces:
            piece = storable.clean(raw)
            if not piece:
                continue
            self.append_chunk(piece)
            if self.appender.cancel_requested:
                return True
            if self.handoff.is_set() or self.rt.shutting_down():
                raise HandedOff(self.job.stream_id)
            if time.monotonic() - self.started > limit:
                raise GenerationError(f"the answer took longer than {limit:.0f}s", "timeout")
            self.maybe_checkpoint()
        if rest := storable.rest():
            self.append_chunk(rest)
        self.sync()
        return self.appender.cancel_requested

    def append_chunk(self, piece: str) -> None:
        """Queue a piece for the log (group commit) and count it in the answer."""
        self.confirm_running()
        self.submit(Event(self.next_seq, CHUNK, text=piece))
        self.next_seq += 1
        self.parts.append(piece)
        self.length += len(piece)
        self.layout.append(self.length)
        if self.first_chunk_at is None:
            self.first_chunk_at = time.monotonic()
            # Nothing to copy before the first piece: the checkpoints' clock starts here, at
            # a random phase. Answers whose first pieces come together (a burst of posts,
            # a worker restart, a model slow to start) then write SQL at different moments,
            # not all in the same instant every interval, stalling every stream's appends.
            self.checkpointed_at = self.first_chunk_at - random.uniform(0, self.sql.interval_s)

    def submit(self, event: Event) -> None:
        try:
            self.appender.submit(event)
        except StaleAttempt:
            raise
        except Exception:
            self.rewind()
            raise

    def sync(self) -> None:
        """Wait until the log has every piece handed to it."""
        try:
            self.appender.flush()
        except StaleAttempt:
            raise
        except Exception:
            self.rewind()
            raise

    def settle(self) -> None:
        """Let queued appends (and SQL's running write) finish, whatever their outcome
        (the attempt is ending)."""
        if self.running is not None:
            self.running.done.wait()
        try:
            self.appender.flush(timeout=10)
        except Exception:
            log.warning("stream=%s appends did not finish cleanly", self.job.stream_id)

    def rewind(self) -> None:
        """Forget the pieces the log did not acknowledge (an append failed)."""
        acked = self.appender.acked
        if acked >= self.next_seq - 1:
            return
        del self.layout[acked:]  # item i is seq i + 1
        length = next((i for i in reversed(self.layout) if isinstance(i, int)), 0)
        self.parts = [self.text[:length]]
        self.saved = None  # the parts were joined: the next checkpoint writes it whole
        self.length = length
        self.next_seq = acked + 1

    def maybe_checkpoint(self) -> None:
        if time.monotonic() - self.checkpointed_at < self.sql.wait_s:
            return
        self.sync()  # SQL never holds text the log does not
        try:
            with self.rt.connect() as conn:
                ok = self.store_checkpoint(store.fenced_writer(conn))
        except OUTAGE_ERRORS as exc:
            # The log holds every piece: the answer goes on, the copy waits for SQL.
            self.sql.failed(self.job.stream_id, "checkpoint", exc)
            self.checkpointed_at = time.monotonic()
            return
        self.sql.answered(self.job.stream_id)
        if not ok:
            raise StaleAttempt(f"stream {self.job.stream_id} checkpoint refused")
        # The next one after 0.8-1 interval: answers that were brought into step (all paused
        # by the same upstream stall, say) drift apart again.
        jitter = random.uniform(0, CHECKPOINT_JITTER * self.sql.interval_s)
        self.checkpointed_at = time.monotonic() - jitter

    def store_checkpoint(self, conn: Connection) -> bool:
        """Copy the answer so far to SQL: what came since the last checkpoint when SQL holds
        that one, else the whole of it. False: another attempt owns the stream."""
        job, saved = self.job, self.saved
        parts, items = len(self.parts), len(self.layout)
        if saved is not None and saved[1] < items and store.checkpoint_more(
            conn, job.stream_id, job.message_id, self.attempt, saved[1],
            self.layout[saved[1]:], "".join(self.parts[saved[0]:]),
        ):  # fmt: skip
            self.saved = (parts, items)
            return True
        text = self.text
        if not store.checkpoint(conn, job.stream_id, job.message_id, self.attempt, text,
                                self.layout):  # fmt: skip
            return False
        self.saved = (parts, items) if items else None
        return True

    def fail(self, code: str, message: str) -> str:
        return self.finish("failed", store.ErrorInfo(code, message))

    def finish(self, status: str, error: store.ErrorInfo | None = None) -> str:
        """Store the final text in SQL, then write the terminal event (SQL first, so a
        client that sees the terminal event always finds the final text stored)."""
        self.confirm_running()
        self.sync()
        seq = self.next_seq
        reason = self.cancel_reason() if status == "cancelled" else None
        ok = self.store_end(status, error, reason)
        if ok is None:  # SQL stayed down past the budget: the sweeper ends it later
            return self.leave_end(status, error, reason)
        if not ok:
            raise StaleAttempt(f"stream {self.job.stream_id} finalize refused")
        self.rt.fault("before-terminal")
        if error is not None:
            event = error_event(seq, error.code, error.message)
        else:
            event = Event(seq, TERMINAL_FOR_STATUS[status], message_id=self.job.message_id,
                          reason=reason or "")  # fmt: skip
        self.submit(event)
        self.sync()
        if self.started_news is not None:
            self.started_news.wait()
        self.job.announce(self.rt, feed.ANSWER_FINISHED, status=status, reason=reason).wait()
        self.rt.metrics.finished(status, time.monotonic() - self.started, self.ttfc())
        if reason == ABANDONED:
            self.rt.metrics.abandoned()
        log.info("stream=%s attempt=%d ended %s at seq=%d", self.job.stream_id, self.attempt,
                 status, seq)  # fmt: skip
        return status

    def cancel_reason(self) -> str | None:
        """Why the cancel was asked: ``abandoned`` when the detach policy asked it (the
        heartbeat or the claim set it in the log's state), else None (a person did)."""
        if self.job.detach_after_s is None:
            return None
        state = ride_out(self.rt, self.job.stream_id, "reading the cancel's reason",
                         lambda: self.rt.log.state(self.job.stream_id))  # fmt: skip
        return state.why

    def store_end(
        self, status: str, error: store.ErrorInfo | None, reason: str | None = None
    ) -> bool | None:
        """``store.finalize``, tried again with backoff while SQL is unreachable, for up to
        RELAY_BACKEND_BUDGET_S; None when it stayed unreachable. Each try waits its turn
        at the runtime's ``EndGate``, so the appends of the streams still running go first."""
        while True:
            try:  # one try per turn of the gate: a retry's backoff does not hold it
                with self.rt.ends.turn(), self.rt.connect() as conn:
                    ok = store.finalize(
                        conn, self.job.stream_id, status=status, text=self.text,
                        layout=self.layout, attempt=self.attempt, error=error,
                        usage=self.usage(), reason=reason,
                    )  # fmt: skip
            except OUTAGE_ERRORS as exc:
                self.sql.failed(self.job.stream_id, "final write", exc)
                if self.sql.down_for() >= self.rt.settings.backend_budget_s:
                    return None
                time.sleep(self.sql.backoff())
                continue
            self.sql.answered(self.job.stream_id)
            return ok

    def leave_end(
        self, status: str, error: store.ErrorInfo | None, reason: str | None = None
    ) -> str:
        """Every piece is in the log but SQL cannot store the end: record the end in the
        log's state for the sweeper (which stores it in SQL, then writes the terminal
        event, once SQL answers) and step aside."""
        payload = {"code": error.code, "message": error.message} if error else None
        if not self.rt.log.pend_end(
            self.job.stream_id, self.attempt, status, payload, self.usage(), reason
        ):
            raise StaleAttempt(f"stream {self.job.stream_id} was taken over")
        log.warning("stream=%s attempt=%d ended %s, but SQL is unreachable: the sweeper "
                    "stores the end", self.job.stream_id, self.attempt, status)  # fmt: skip
        return "end-pending"

    def usage(self) -> dict[str, Any]:
        report = self.request.report
        values = {
            "model": report.model or self.job.model,
            "prompt_tokens": report.prompt_tokens,
            "completion_tokens": report.completion_tokens,
            "finish_reason": report.finish_reason,
        }
        return {k: v for k, v in values.items() if v is not None}

    def ttfc(self) -> float | None:
        return None if self.first_chunk_at is None else self.first_chunk_at - self.started


class Countdown:
    """One stream's place in the relay_detach_countdowns gauge: counted while its detach
    policy counts down (no viewer attached), and never again once closed."""

    def __init__(self, rt: WorkerRuntime) -> None:
        self.rt = rt
        self.counted = False
        self.closed = False
        self.lock = threading.Lock()

    def set(self, unwatched: bool) -> None:
        with self.lock:
            counted = unwatched and not self.closed
            if counted != self.counted:
                self.counted = counted
                self.rt.metrics.counting_down(1 if counted else -1)

    def close(self) -> None:
        with self.lock:
            self.closed = True
        self.set(False)


@contextmanager
def watch(rt: WorkerRuntime, writer: LogWriter) -> Iterator[None]:
    """While the body runs: keep the heartbeat fresh (even between slow chunks), turn a
    Celery revoke of this task into a cancel, and hand off when the worker shuts down."""
    stop = threading.Event()
    sid, attempt = writer.job.stream_id, writer.attempt

    interval = rt.settings.heartbeat_interval_s
    # A stream with a detach policy beats every interval even while it appends: the beat is
    # what looks for its viewers (and cancels it once nobody has watched for that long).
    detach = writer.job.detach_after_s is not None
    countdown = Countdown(rt)

    def beat() -> None:
        while not stop.wait(interval):
            try:
                # Each append refreshes the heartbeat and reports a cancel or a lost fence:
                # a stream that appended within the interval needs no separate beat.
                if detach or time.monotonic() - writer.appender.acked_at >= interval:
                    answer = rt.log.heartbeat(sid, attempt, detach)
                    countdown.set(answer.unwatched)
                    if not answer.owner:
                        writer.request.abort.abort()  # fenced off: stop paying for tokens
                        return
                    if answer.cancel:
                        writer.request.abort.abort()  # closes the upstream at once
                if rt.is_revoked(writer.task_id):
                    rt.log.cancel(sid, rt.settings.heartbeat_stale_s)
                if rt.shutting_down():
                    writer.handoff.set()
                    writer.request.abort.abort()  # a silent generator must not hold us up
                if time.monotonic() - writer.started > rt.settings.max_generation_s:
                    writer.timed_out.set()
                    writer.request.abort.abort()
            except Exception:  # keep beating through a Redis blip; the next beat retries
                log.warning("stream=%s heartbeat failed", sid, exc_info=True)

    # Not waiting for it to begin: under gevent that is a turn of the event loop between the
    # claim and the upstream request (the beat's first wait is an interval away anyway).
    start_background(beat, f"heartbeat-{sid[:8]}")
    try:
        yield
    finally:
        stop.set()
        countdown.close()
