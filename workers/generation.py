"""Run one attempt of a generation: claim the stream, write every piece to the log, finish.

Plain functions and a small writer class; ``workers.tasks`` is the thin Celery wrapper.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Generator, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select

from models import store
from models.events import CHUNK, TERMINAL_FOR_STATUS, Event, error_event
from models.exceptions import GenerationError, LogUnavailable, StaleAttempt
from models.tables import TERMINAL_STREAM_STATUSES, Message, Stream
from workers.generators import GenerationRequest, Turn
from workers.runtime import WorkerRuntime

log = logging.getLogger("relay.worker")


@dataclass(frozen=True)
class Job:
    stream_id: str
    message_id: str
    status: str
    history: tuple[Turn, ...]
    model: str | None = None
    attempt: int = 0


class HandedOff(Exception):
    """The worker is shutting down: the stream was released for another worker."""


def load_job(rt: WorkerRuntime, stream_id: str) -> Job | None:
    """Load the stream and the conversation before its answer (two plain queries: this is
    on the path from a post to its first chunk)."""
    with rt.sessions() as db:
        row = db.execute(
            select(Stream.message_id, Stream.chat_id, Stream.status, Stream.attempt,
                   Message.position, Message.model)
            .join(Message, Message.id == Stream.message_id)
            .where(Stream.id == stream_id)
        ).first()  # fmt: skip
        if row is None:
            return None
        message_id, chat_id, status, attempt, position, model = row
        turns = db.execute(
            select(Message.role, Message.content)
            .where(Message.chat_id == chat_id, Message.position < position)
            .order_by(Message.position)
        )
        history = tuple(Turn(role, content) for role, content in turns if content)
        return Job(stream_id, message_id, status, history, model, attempt)


def run_generation(rt: WorkerRuntime, stream_id: str, task_id: str) -> str:
    """Run one attempt; return what happened (done, cancelled, failed, busy, ...)."""
    job = load_job(rt, stream_id)
    if job is None:
        log.warning("stream=%s not found; dropping task %s", stream_id, task_id)
        return "missing"
    if job.status in TERMINAL_STREAM_STATUSES:
        return "finished"
    claim = rt.log.claim(
        stream_id, task_id, rt.settings.heartbeat_stale_s, rt.worker_name, job.attempt
    )
    if claim.result != "claimed":
        log.info("stream=%s task=%s not started: %s", stream_id, task_id, claim.result)
        return claim.result
    log.info("stream=%s attempt=%d task=%s from seq=%d", stream_id, claim.attempt, task_id,
             claim.last_seq)  # fmt: skip
    writer = LogWriter(rt, job, claim.attempt, claim.last_seq, task_id)
    try:
        with rt.sessions() as db:
            store.mark_running(db, stream_id, job.message_id, claim.attempt, task_id)
        with watch(rt, writer):
            if claim.cancel_requested:
                return writer.finish("cancelled")
            return writer.run()
    except StaleAttempt:
        log.warning("stream=%s attempt=%d was superseded; stopping", stream_id, claim.attempt)
        return "superseded"
    except HandedOff:
        writer.settle()  # what was handed to the log is in it before another worker reads it
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
        return writer.finish("cancelled")


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
        self.started = time.monotonic()
        # A random first checkpoint: answers that start together (a burst of posts, a
        # worker restart) do not all write SQL in the same instant every interval.
        interval = rt.settings.checkpoint_interval_s
        self.checkpointed_at = self.started - random.uniform(0, interval)
        self.handoff = threading.Event()  # set by the watcher when the worker shuts down
        self.timed_out = threading.Event()  # set by the watcher past max_generation_s
        self.first_chunk_at: float | None = None
        self.request = GenerationRequest(job.stream_id, job.history, partial=text, model=job.model)

    @property
    def text(self) -> str:
        return "".join(self.parts)

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
        except (StaleAttempt, HandedOff):
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
        for piece in pieces:
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
        self.sync()
        return self.appender.cancel_requested

    def append_chunk(self, piece: str) -> None:
        """Queue a piece for the log (group commit) and count it in the answer."""
        self.submit(Event(self.next_seq, CHUNK, text=piece))
        self.next_seq += 1
        self.parts.append(piece)
        self.length += len(piece)
        self.layout.append(self.length)
        if self.first_chunk_at is None:
            self.first_chunk_at = time.monotonic()

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
        """Let queued appends finish, whatever their outcome (the attempt is ending)."""
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
        self.length = length
        self.next_seq = acked + 1

    def maybe_checkpoint(self) -> None:
        if time.monotonic() - self.checkpointed_at < self.rt.settings.checkpoint_interval_s:
            return
        self.sync()  # SQL never holds text the log does not
        with self.rt.sessions() as db:
            job = self.job
            if not store.checkpoint(
                db, job.stream_id, job.message_id, self.attempt, self.text, self.layout
            ):
                raise StaleAttempt(f"stream {self.job.stream_id} checkpoint refused")
        self.checkpointed_at = time.monotonic()

    def fail(self, code: str, message: str) -> str:
        return self.finish("failed", store.ErrorInfo(code, message))

    def finish(self, status: str, error: store.ErrorInfo | None = None) -> str:
        """Store the final text in SQL, then write the terminal event (SQL first, so a
        client that sees the terminal event always finds the final text stored)."""
        self.sync()
        seq = self.next_seq
        with self.rt.sessions() as db:
            ok = store.finalize(
                db,
                self.job.stream_id,
                status=status,
                text=self.text,
                layout=self.layout,
                attempt=self.attempt,
                error=error,
                usage=self.usage(),
            )
        if not ok:
            raise StaleAttempt(f"stream {self.job.stream_id} finalize refused")
        self.rt.fault("before-terminal")
        if error is not None:
            event = error_event(seq, error.code, error.message)
        else:
            event = Event(seq, TERMINAL_FOR_STATUS[status], message_id=self.job.message_id)
        self.submit(event)
        self.sync()
        self.rt.metrics.finished(status, time.monotonic() - self.started, self.ttfc())
        log.info("stream=%s attempt=%d ended %s at seq=%d", self.job.stream_id, self.attempt,
                 status, seq)  # fmt: skip
        return status

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


@contextmanager
def watch(rt: WorkerRuntime, writer: LogWriter) -> Iterator[None]:
    """While the body runs: keep the heartbeat fresh (even between slow chunks), turn a
    Celery revoke of this task into a cancel, and hand off when the worker shuts down."""
    stop = threading.Event()
    sid, attempt = writer.job.stream_id, writer.attempt

    interval = rt.settings.heartbeat_interval_s

    def beat() -> None:
        while not stop.wait(interval):
            try:
                # Each append refreshes the heartbeat and reports a cancel or a lost fence:
                # a stream that appended within the interval needs no separate beat.
                if time.monotonic() - writer.appender.acked_at >= interval:
                    owner, cancel = rt.log.heartbeat(sid, attempt)
                    if not owner:
                        writer.request.abort.abort()  # fenced off: stop paying for tokens
                        return
                    if cancel:
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

    thread = threading.Thread(target=beat, name=f"heartbeat-{sid[:8]}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
