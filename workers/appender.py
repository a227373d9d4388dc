"""Group commit: one thread per worker process sends every generation's pending events.

A generation hands each piece to its ``StreamAppender`` and goes back to reading its
upstream at once. The flusher thread takes whatever is pending when it wakes (the pieces
that arrived while the previous round trip was in flight, from every stream of the process)
and sends it as one pipeline with one ``append_many`` per stream. An idle stream's piece goes
out as soon as it arrives, so latency does not grow; a busy one's pieces share a round trip
and a script call. ``coalesce_s`` (RELAY_COALESCE_MS) makes the flusher wait that long after
it wakes, to gather more pieces per call from providers that send many tiny ones.

What the log acknowledged is the truth: ``acked`` is the last seq the log confirmed, and a
failed append is reported once to the generation, which forgets the pieces after ``acked``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from models.chunklog import ChunkLog
from models.events import Event
from models.exceptions import LogUnavailable, StaleAttempt
from models.redisconn import PinnedConnection

log = logging.getLogger("relay.worker")
Reply = bool | Exception  # cancel pending, or why the append failed
# The connection failed mid round trip: each append in it may or may not have been applied.
UNKNOWN_OUTCOME = (RedisConnectionError, RedisTimeoutError, OSError)


class StreamAppender:
    """One attempt's queue of events for the log."""

    def __init__(self, group: GroupAppender, stream_id: str, attempt: int, last_seq: int):
        self.group = group
        # Waited on by this stream's own generation only (flush, or a full queue); notified
        # when one of its appends completes. The flusher never wakes other streams' waiters.
        self.changed = threading.Condition(group.lock)
        self.stream_id = stream_id
        self.attempt = attempt
        self.acked = last_seq  # the last seq the log has confirmed
        self.acked_at = 0.0  # when (monotonic): an append also refreshes the heartbeat
        self.cancel_requested = False  # an append reported a pending cancel
        self.pending: list[Event] = []
        self.in_flight = False
        self.error: Exception | None = None
        self.waiters = 0  # threads in ``changed.wait``: the flusher notifies only then

    def submit(self, event: Event) -> None:
        """Queue ``event`` (seq ``acked`` + pending + 1) for the next round trip."""
        self.group.submit(self, event)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until the log has every submitted event (raises what made an append fail)."""
        self.group.flush(self, timeout)


class GroupAppender:
    """The worker process's flusher: many streams' events per Redis round trip."""

    def __init__(
        self,
        chunks: ChunkLog,
        *,
        coalesce_s: float = 0.0,
        max_events: int = 512,
        max_pending: int = 8192,
        on_appended: Callable[[int], None] = lambda n: None,
        recheck_idle_s: float = 1.0,
        budget_s: float = 30.0,
    ) -> None:
        self.chunks = chunks
        self.on_appended = on_appended  # events the log confirmed, once per round trip
        self.recheck_idle_s = recheck_idle_s  # see PinnedConnection
        self.budget_s = budget_s  # how long an outage is ridden out before appends fail
        self._appended = 0  # confirmed, not yet reported (the flusher's own)
        self._reported_at = 0.0
        self.coalesce_s = coalesce_s
        self.max_events = max_events  # per stream per round trip
        self.max_pending = max_pending  # a generation waits when Redis falls this far behind
        self.lock = threading.Lock()
        self._work = threading.Condition(self.lock)  # the flusher waits here for ready streams
        self._ready: dict[StreamAppender, None] = {}  # streams with events to send, in order
        self._thread: threading.Thread | None = None
        self._conn: PinnedConnection | None = None  # the flusher's own, made on first use

    def open(self, stream_id: str, attempt: int, last_seq: int) -> StreamAppender:
        with self.lock:
            self._ensure_thread()
        return StreamAppender(self, stream_id, attempt, last_seq)

    def submit(self, stream: StreamAppender, event: Event) -> None:
        with self.lock:
            self._raise_error(stream)
            while len(stream.pending) >= self.max_pending:
                self._wait(stream)
                self._raise_error(stream)
            stream.pending.append(event)
            if not stream.in_flight and stream not in self._ready:
                self._ready[stream] = None
                self._work.notify()

    def flush(self, stream: StreamAppender, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            while (stream.pending or stream.in_flight) and stream.error is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"stream {stream.stream_id}: appends still pending")
                self._wait(stream, left)
            self._raise_error(stream)

    @staticmethod
    def _wait(stream: StreamAppender, timeout: float | None = None) -> None:
        """Wait (holding the lock) until one of the stream's appends completes."""
        stream.waiters += 1
        try:
            stream.changed.wait(timeout)
        finally:
            stream.waiters -= 1

    @staticmethod
    def _raise_error(stream: StreamAppender) -> None:
        """Report a failed append once; the events after ``acked`` were not written."""
        error, stream.error = stream.error, None
        if error is not None:
            stream.pending.clear()
            raise error

    # -- the flusher ------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="relay-appender", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            work = self._take()
            replies = self._send(work)
            self._settle(work, replies)

    def _take(self) -> list[tuple[StreamAppender, list[Event]]]:
        with self.lock:
            while not self._ready:
                if not self._appended:
                    self._work.wait()
                elif (left := self._reported_at + 1.0 - time.monotonic()) > 0:
                    self._work.wait(left)
                else:  # idle for a while: the count is exact
                    self._report_appended()
            if self.coalesce_s > 0:
                deadline = time.monotonic() + self.coalesce_s
                while (left := deadline - time.monotonic()) > 0:
                    self._work.wait(left)
            work = []
            for stream in self._ready:
                events = stream.pending[: self.max_events]
                del stream.pending[: self.max_events]
                stream.in_flight = True
                work.append((stream, events))
            self._ready.clear()
            return work

    def _send(self, work: list[tuple[StreamAppender, list[Event]]]) -> list[Reply]:
        """One round trip for every stream's events; a reply per stream."""
        try:
            return self._append(work)
        except UNKNOWN_OUTCOME as exc:
            log.warning("appending to the log failed (%s): reading what it has", exc)
            return self._recover(work)
        except Exception as exc:  # not the connection: every stream of this round failed
            log.warning("appending to the log failed: %s", exc)
            return [exc for _ in work]

    def _append(self, work: Sequence[tuple[StreamAppender, list[Event]]]) -> list[Reply]:
        replies = self._pipeline(work)
        retry = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if retry:  # Redis restarted or was flushed: load the script, send those again
            self.chunks.load_scripts()
            again = self._pipeline([work[i] for i in retry])
            for i, reply in zip(retry, again, strict=True):
                replies[i] = reply
        return [self._reply(s, r) for (s, _), r in zip(work, replies, strict=True)]

    def _recover(self, work: list[tuple[StreamAppender, list[Event]]]) -> list[Reply]:
        """The connection failed during a round trip, so whether each append was applied is
        unknown (a lost reply is not a lost write). Never guess: read each stream's state,
        send again only what the log does not have, and keep at it with backoff for
        ``budget_s``; only an outage longer than that fails the appends (LogUnavailable)."""
        deadline = time.monotonic() + self.budget_s
        replies: list[Reply | None] = [None] * len(work)
        delay = 0.05
        while True:
            unsettled = [i for i, r in enumerate(replies) if r is None]
            if not unsettled:
                return [r for r in replies if r is not None]
            try:
                self._settle_unknown(work, unsettled, replies)
                continue
            except UNKNOWN_OUTCOME as exc:
                if time.monotonic() + delay >= deadline:
                    error = LogUnavailable(f"the log was unreachable for {self.budget_s:g}s: {exc}")
                    return [error if r is None else r for r in replies]
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    def _settle_unknown(
        self,
        work: list[tuple[StreamAppender, list[Event]]],
        unsettled: list[int],
        replies: list[Reply | None],
    ) -> None:
        """Read the unsettled streams' states; settle what the log has, send the rest again."""
        assert self._conn is not None
        states = self._conn.pipeline([self.chunks.position_command(work[i][0].stream_id)
                                      for i in unsettled])  # fmt: skip
        resend = []
        for i, state in zip(unsettled, states, strict=True):
            stream, events = work[i]
            outcome = ChunkLog.append_outcome(state, stream.attempt, events[0].seq, events[-1].seq)
            if outcome.startswith("written"):
                replies[i] = outcome == "written+cancel"
            elif outcome == "missing":
                resend.append(i)
            elif outcome == "stale":
                replies[i] = ChunkLog.fenced_off(stream.stream_id, stream.attempt)
            else:
                replies[i] = LogUnavailable(f"the log of stream {stream.stream_id} is gone")
        if resend:
            again = self._append([work[i] for i in resend])
            for i, reply in zip(resend, again, strict=True):
                replies[i] = reply

    def _pipeline(self, work: Sequence[tuple[StreamAppender, list[Event]]]) -> list[object]:
        if self._conn is None:
            self._conn = PinnedConnection(self.chunks.redis, self.recheck_idle_s)
        append = self.chunks.append_command
        return self._conn.pipeline([append(s.stream_id, s.attempt, ev) for s, ev in work])

    @staticmethod
    def _reply(stream: StreamAppender, reply: object) -> Reply:
        if isinstance(reply, Exception):
            return reply
        try:
            return ChunkLog.append_result(stream.stream_id, stream.attempt, reply)
        except StaleAttempt as exc:
            return exc

    def _settle(self, work: list[tuple[StreamAppender, list[Event]]], replies: list[Reply]) -> None:
        appended = 0
        now = time.monotonic()
        with self.lock:
            for (stream, events), reply in zip(work, replies, strict=True):
                stream.in_flight = False
                if isinstance(reply, Exception):
                    stream.error = reply
                else:
                    stream.acked = events[-1].seq
                    appended += len(events)
                    stream.acked_at = now
                    stream.cancel_requested = stream.cancel_requested or reply
                    if stream.pending:
                        self._ready[stream] = None
                if stream.waiters:
                    stream.changed.notify_all()
        self._appended += appended
        if now - self._reported_at >= 1.0:
            self._report_appended()

    def _report_appended(self) -> None:
        """Hand the count of confirmed events to ``on_appended``: at most once a second,
        and a second after the last append when the flusher goes idle (an increment of a
        multiprocess Prometheus counter costs about as much as reading a chunk)."""
        self._reported_at = time.monotonic()
        if self._appended:
            n, self._appended = self._appended, 0
            self.on_appended(n)
