"""Group commit: one thread per worker process sends every generation's pending events.

A generation hands each piece to its ``StreamAppender`` and goes back to reading its
upstream at once. The flusher thread takes whatever is pending when it wakes (the pieces
that arrived while the previous round trip was in flight, from every stream of the process)
and sends it in one round trip: on one Redis server one script call for all of them
(``append_all``: each stream's append on its own, as ``append_many``; a call per
``max_events`` events at most), on a cluster an ``append_many`` per stream. An idle stream's
piece goes out as soon as it arrives, so latency does not grow; a busy one's pieces share a
round trip and a script call. Under load (the last round trip started less than ``busy_s``
ago) the flusher first lets the process's other threads run ``gather`` times (RELAY_APPEND_GATHER;
under gevent, turns of the event loop), so the pieces whose upstream data has already
arrived join this round trip rather than the next: fewer, larger appends, with no timer and
so no wait beyond the work that is ready. ``coalesce_s`` (RELAY_COALESCE_MS) makes the
flusher wait that long after every wake-up, to gather more pieces per call from providers
that send many tiny ones.

What the log acknowledged is the truth: ``acked`` is the last seq the log confirmed, and a
failed append is reported once to the generation, which forgets the pieces after ``acked``.

Unless a Sentinel failover takes it back: a replica promoted before it received the last
appends has a log that ends before ``acked``. The append script refuses to leave a gap
(``behind``), and the flusher sends the missing events again from the ones it keeps (the
last ``KEEP_EVENTS`` confirmed per stream), the same events at the same seqs, so a viewer
that saw them from the old master sees nothing new and one that attaches sees no hole.
``wait_replicas`` (RELAY_REDIS_WAIT_REPLICAS) adds Redis's ``WAIT`` to every round trip, so
an append is confirmed only once that many replicas have it.

Other commands can ride a round trip (``ride``: the feed's ``answer.*`` events): they go
after the appends of the same pipeline, on the flusher's connection. Answers that end
together then need no pool connection each (200 ends at once opened as many) and no round
trip of their own.

On a Redis Cluster the round trip is a ``ClusterPipeline``: each stream's append goes to the
master that owns its slot (every key of a stream shares its hash tag), all nodes' shares are
written before any reply is read, and a MOVED or ASK reply (the append did not run) is sent
again where the cluster says. A node that fails, or a cluster that answers CLUSTERDOWN or
TRYAGAIN, leaves the appends sent there of unknown outcome (the other nodes' replies stand),
recovered as above from each stream's state, read from the slot's owner once the slot map
has been read again. The recovery runs in the flusher, so the process's other streams wait
for it (a replica's promotion: seconds; a node that stays down: up to the budget).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from models.chunklog import ChunkLog
from models.events import Event
from models.exceptions import LogBehind, LogUnavailable, StaleAttempt
from models.redisconn import ClusterPipeline, PinnedConnection, pipeliner

log = logging.getLogger("relay.worker")
Reply = bool | Exception  # cancel pending, or why the append failed
# The connection failed mid round trip: each append in it may or may not have been applied.
UNKNOWN_OUTCOME = (RedisConnectionError, RedisTimeoutError, OSError)
KEEP_EVENTS = 4096  # confirmed events kept per stream, to refill a log a failover cut short
# A kept event as the log stores it: (seq, type, data). CPython's collector stops tracking a
# tuple of an int and two strings (it cannot be part of a cycle), so the tens of thousands a
# busy worker keeps cost its full collections nothing; as Event objects, 30,000 of them made
# each full collection take ~50 ms on the latency benchmark, every stream of the process
# waiting (its p99.9; docs/performance.md).
Kept = tuple[int, str, str]
REFILLS = 3  # refills of one round trip (a failover during a refill needs another)


class Ride:
    """A command sent with the flusher's next round trip, and its reply once it came."""

    def __init__(self, command: Sequence[Any]) -> None:
        self.command = command
        self.reply: Any = None
        self._done = threading.Event()

    def answer(self, reply: Any) -> None:
        self.reply = reply
        self._done.set()

    @property
    def answered(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Any:
        """The reply; raises it when it is an error (a NoScriptError, a cluster node that
        did not answer, the connection lost: whether it ran is then unknown), and
        TimeoutError when it did not come within ``timeout``."""
        if not self._done.wait(timeout):
            raise TimeoutError("the flusher's round trip did not come back in time")
        if isinstance(self.reply, Exception):
            raise self.reply
        return self.reply


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
        self.kept: deque[Kept] = deque(maxlen=KEEP_EVENTS)  # the last confirmed, in order
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
        gather: int = 0,
        busy_s: float = 0.001,
        max_events: int = 512,
        max_pending: int = 8192,
        on_appended: Callable[[int], None] = lambda n: None,
        recheck_idle_s: float = 1.0,
        budget_s: float = 30.0,
        wait_replicas: int = 0,
        wait_ms: int = 1000,
    ) -> None:
        self.chunks = chunks
        self.wait_replicas = wait_replicas  # WAIT for this many replicas after each round trip
        self.wait_ms = wait_ms
        self._short_wait_at = 0.0  # when a WAIT last came back short (logged once a minute)
        self.on_appended = on_appended  # events the log confirmed, once per round trip
        self.recheck_idle_s = recheck_idle_s  # see PinnedConnection
        self.budget_s = budget_s  # how long an outage is ridden out before appends fail
        self._appended = 0  # confirmed, not yet reported (the flusher's own)
        self._reported_at = 0.0
        self.coalesce_s = coalesce_s
        self.gather = gather  # turns given to other threads under load before a round trip
        self.busy_s = busy_s  # a round trip this soon after the last one: under load
        self._round_at = -1e9  # when the last round trip was taken (monotonic)
        # The flusher sleeps on ``_wake`` when it has nothing to send (``_idle``, under the
        # lock), and a submit sets it only then. Not a Condition: under gevent a notify and
        # the lock handed back and forth around it cost a submit ~25 µs, a plain Event
        # ~1.5 µs (docs/performance.md).
        self._idle = False
        self._wake = threading.Event()
        self.max_events = max_events  # per stream per round trip
        self.max_pending = max_pending  # a generation waits when Redis falls this far behind
        self.lock = threading.Lock()
        self._ready: dict[StreamAppender, None] = {}  # streams with events to send, in order
        self._riders: list[Ride] = []  # commands for the next round trip
        self._riding: list[Ride] = []  # this round trip's, until its first pipeline sends them
        self._thread: threading.Thread | None = None
        # The flusher's own connection (on a cluster: one per node), made on first use.
        self._conn: PinnedConnection | ClusterPipeline | None = None

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
                self._wake_flusher()

    def ride(self, command: Sequence[Any]) -> Ride:
        """Send ``command`` with the next round trip, after its appends (a rider does not
        wait for a round trip of its own)."""
        ride = Ride(command)
        with self.lock:
            self._ensure_thread()
            self._riders.append(ride)
            self._wake_flusher()
        return ride

    def _wake_flusher(self) -> None:
        """(Holding the lock.) There is work: wake the flusher if it sleeps."""
        if self._idle:
            self._idle = False
            self._wake.set()

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
            work: list[tuple[StreamAppender, list[Event]]] = []
            riders: list[Ride] = []
            try:
                work, self._riding = self._take()
                riders = self._riding
                replies = self._send(work)
                for ride in riders:  # the round trip failed before its pipeline was sent
                    if not ride.answered:
                        ride.answer(LogUnavailable("the round trip was not sent"))
                self._settle(work, replies)
            except Exception as exc:  # our own code failed, not Redis: those are replies
                log.exception("the appender's round trip failed")
                self._abandon(work, riders, exc)
                time.sleep(0.1)  # a failure that repeats must not spin

    def _abandon(
        self, work: list[tuple[StreamAppender, list[Event]]], riders: list[Ride], exc: Exception
    ) -> None:
        """After a failure of the flusher itself, nobody may wait for it forever: the
        round's appends not yet settled fail as LogUnavailable (whether they reached the log
        is unknown, as after a lost connection; the next attempt reads what it has), its
        riders get the same error, and the flusher goes on with the next round."""
        error = LogUnavailable(f"the appender failed ({type(exc).__name__}: {exc})")
        for ride in riders:
            if not ride.answered:
                ride.answer(error)
        with self.lock:
            for stream, _ in work:
                if stream.in_flight:
                    stream.in_flight = False
                    stream.error = error
                if stream.waiters:
                    stream.changed.notify_all()

    def _take(self) -> tuple[list[tuple[StreamAppender, list[Event]]], list[Ride]]:
        with self.lock:
            while not self._ready and not self._riders:
                if not self._appended:
                    self._sleep(None)
                elif (left := self._reported_at + 1.0 - time.monotonic()) > 0:
                    self._sleep(left)
                else:  # idle for a while: the count is exact
                    self._report_appended()
            if self.coalesce_s > 0:
                self._sleep_through(self.coalesce_s)
            elif time.monotonic() - self._round_at < self.busy_s:
                self._yield(self.gather)
            self._round_at = time.monotonic()
            work = []
            for stream in self._ready:
                events = stream.pending[: self.max_events]
                del stream.pending[: self.max_events]
                stream.in_flight = True
                work.append((stream, events))
            self._ready.clear()
            riders, self._riders = self._riders, []
            return work, riders

    def _sleep(self, timeout: float | None) -> None:
        """(Holding the lock.) Sleep until a submit or a ride wakes the flusher, or for
        ``timeout``, the lock released meanwhile."""
        self._idle = True
        self.lock.release()
        try:
            self._wake.wait(timeout)
        finally:
            self.lock.acquire()
            self._idle = False
            self._wake.clear()

    def _sleep_through(self, seconds: float) -> None:
        """(Holding the lock.) Let ``seconds`` pass, the lock released: what is submitted
        meanwhile joins this round trip (the flusher is not idle: nothing wakes it)."""
        self.lock.release()
        try:
            time.sleep(seconds)
        finally:
            self.lock.acquire()

    def _yield(self, turns: int) -> None:
        """Let the other threads run ``turns`` times, the lock released (under gevent,
        ``sleep(0)`` is a turn of the event loop: every greenlet whose socket is ready runs)."""
        for _ in range(turns):
            self.lock.release()
            try:
                self._turn()
            finally:
                self.lock.acquire()

    @staticmethod
    def _turn() -> None:
        time.sleep(0)

    def _send(self, work: list[tuple[StreamAppender, list[Event]]]) -> list[Reply]:
        """One round trip for every stream's events; a reply per stream."""
        try:
            replies = self._append(work)
        except UNKNOWN_OUTCOME as exc:
            log.warning("appending to the log failed (%s): reading what it has", exc)
            return self._recover(work)
        except Exception as exc:  # not the connection: every stream of this round failed
            log.warning("appending to the log failed: %s", exc)
            return [exc for _ in work]
        # On a cluster, one node's failure leaves only its streams' appends unknown.
        lost = [i for i, reply in enumerate(replies) if isinstance(reply, UNKNOWN_OUTCOME)]
        if lost:
            log.warning(
                "appending to the log failed for %d of %d streams (%s): reading what it has",
                len(lost), len(work), replies[lost[0]],
            )  # fmt: skip
            found = self._recover([work[i] for i in lost])
            for i, reply in zip(lost, found, strict=True):
                replies[i] = reply
        return replies

    def _append(self, work: Sequence[tuple[StreamAppender, list[Event]]]) -> list[Reply]:
        """Send the appends; refill what a failover took from a log (``LogBehind``)."""
        replies = self._append_once(work)
        for _ in range(REFILLS):
            behind = [i for i, r in enumerate(replies) if isinstance(r, LogBehind)]
            if not behind:
                break
            refills = []
            for i in behind:
                stream, events = work[i]
                have = replies[i].seq  # type: ignore[union-attr]
                refill = self._refill(stream, events, have)
                log.warning(
                    "stream %s: the log ends at seq %d, before %d (a failover lost appends): %s",
                    stream.stream_id, have, events[0].seq,
                    "sending them again" if refill else "too many to send again",
                )  # fmt: skip
                if refill is None:  # the continuation of a new attempt starts from the log
                    replies[i] = ChunkLog.fenced_off(stream.stream_id, stream.attempt)
                else:
                    refills.append((i, (stream, refill)))
            if refills:
                again = self._append_once([w for _, w in refills])
                for (i, _), reply in zip(refills, again, strict=True):
                    replies[i] = reply
        return [
            ChunkLog.fenced_off(s.stream_id, s.attempt) if isinstance(r, LogBehind) else r
            for (s, _), r in zip(work, replies, strict=True)
        ]

    @staticmethod
    def _refill(stream: StreamAppender, events: list[Event], have: int) -> list[Event] | None:
        """``events`` preceded by the kept ones after seq ``have``, or None if some of those
        are no longer kept."""
        kept = [Event.decode(*k) for k in stream.kept if have < k[0] < events[0].seq]
        refill = kept + events
        return refill if refill[0].seq == have + 1 else None

    def _append_once(self, work: Sequence[tuple[StreamAppender, list[Event]]]) -> list[Reply]:
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
        unknown: Exception | None = None  # a cluster node that did not answer: try again
        for i, state in zip(unsettled, states, strict=True):
            stream, events = work[i]
            if isinstance(state, UNKNOWN_OUTCOME):
                unknown = state
                continue
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
                if isinstance(reply, UNKNOWN_OUTCOME):
                    unknown = reply  # unsettled still
                else:
                    replies[i] = reply
        if unknown is not None:
            raise unknown

    def _pipeline(self, work: Sequence[tuple[StreamAppender, list[Event]]]) -> list[object]:
        if self._conn is None:
            self._conn = pipeliner(self.chunks.redis, self.recheck_idle_s)
        commands, spans = self._commands(work)
        appends = len(commands)
        riders, self._riding = self._riding, []  # the round trip's first pipeline takes them
        commands += [ride.command for ride in riders]
        if self.wait_replicas:
            commands.append(["WAIT", self.wait_replicas, self.wait_ms])
        try:
            replies = self._conn.pipeline(commands)
        except Exception as exc:
            for ride in riders:
                ride.answer(exc)
            raise
        if self.wait_replicas:
            self._check_wait(replies.pop())
        for ride, reply in zip(riders, replies[appends:], strict=True):
            ride.answer(reply)
        if spans is None:
            return replies[:appends]
        out: list[object] = []
        for span, reply in zip(spans, replies[:appends], strict=True):
            out += ChunkLog.append_all_replies(reply, span)
        return out

    def _commands(
        self, work: Sequence[tuple[StreamAppender, list[Event]]]
    ) -> tuple[list[Sequence[Any]], list[int] | None]:
        """The appends' commands, and how many streams each carries (None: one each)."""
        if isinstance(self._conn, ClusterPipeline):  # a call per stream, to its slot's node
            append = self.chunks.append_command
            return [append(s.stream_id, s.attempt, ev) for s, ev in work], None
        spans = self._spans(work)
        commands: list[Sequence[Any]] = []
        start = 0
        for span in spans:
            part = work[start : start + span]
            commands.append(self.chunks.append_all_command(
                [(s.stream_id, s.attempt, ev) for s, ev in part]))  # fmt: skip
            start += span
        return commands, spans

    def _spans(self, work: Sequence[tuple[StreamAppender, list[Event]]]) -> list[int]:
        """How many streams go in each script call on one server: all of them, unless they
        carry more than ``max_events`` events (a call holds Redis for its whole length)."""
        spans, streams, events = [], 0, 0
        for _, evs in work:
            if streams and events + len(evs) > self.max_events:
                spans.append(streams)
                streams, events = 0, 0
            streams += 1
            events += len(evs)
        if streams:
            spans.append(streams)
        return spans

    def _check_wait(self, acknowledged: object) -> None:
        """A WAIT that timed out still confirms the appends (Redis applied them): say so, at
        most once a minute, since a failover now could lose them."""
        if isinstance(acknowledged, int) and acknowledged >= self.wait_replicas:
            return
        now = time.monotonic()
        if now - self._short_wait_at >= 60:
            self._short_wait_at = now
            log.warning(
                "appends reached %s of %d replicas within %d ms (RELAY_REDIS_WAIT_REPLICAS)",
                acknowledged, self.wait_replicas, self.wait_ms,
            )  # fmt: skip

    @staticmethod
    def _reply(stream: StreamAppender, reply: object) -> Reply:
        if isinstance(reply, Exception):
            return reply
        try:
            return ChunkLog.append_result(stream.stream_id, stream.attempt, reply)
        except (StaleAttempt, LogBehind) as exc:
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
                    stream.kept.extend([(e.seq, e.type, e.payload()) for e in events])
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
