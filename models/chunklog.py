"""The durable chunk log in Redis: one Redis Stream per stream ID, written through Lua.

Writers (workers) append through ``append_many``, an atomic script that refuses a stale
attempt, reports a pending cancel in the same round trip and publishes what it added on the
stream's live channel. Readers (web) use ``read``. Entry IDs are ``0-<seq>``, so Redis
itself refuses an entry that is not above the last one: the natural fence against a
duplicate writer. The scripts are in ``models.scripts``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis
from redis.cluster import RedisCluster
from redis.exceptions import ResponseError

from models import keys, scripts
from models.events import STATUS_FOR_TERMINAL, Event
from models.exceptions import LogBehind, StaleAttempt
from models.redisconn import RedisClient, ScriptCall, server_time_ms, sharded_pubsub
from models.store import Layout, layout_item


@dataclass(frozen=True)
class Claim:
    result: str  # claimed | busy | finished
    attempt: int
    last_seq: int
    cancel_requested: bool
    tries: int = 0  # claims so far, this one included (the attempt budget)


@dataclass(frozen=True)
class Beat:
    """A heartbeat's answer: the attempt still owns the stream; it should stop (a cancel was
    asked, or the detach policy found it abandoned); no viewer is attached (counting down)."""

    owner: bool
    cancel: bool
    unwatched: bool = False


@dataclass(frozen=True)
class DetachStatus:
    now_ms: int  # Redis's clock
    policy_ms: int | None  # cancel after this long without a viewer; None: continue
    unwatched_since_ms: int | None  # no viewer since then; None: one is attached (or unknown)

    @property
    def cancel_at_ms(self) -> int | None:
        if self.policy_ms is None or self.unwatched_since_ms is None:
            return None
        return self.unwatched_since_ms + self.policy_ms


# What ``mark_requeue`` decides.
REQUEUE_NO, REQUEUE_SEND, REQUEUE_OVER_BUDGET = 0, 1, 2


def resend_wait(stale_after_s: float) -> float:
    """How long a copy sent by recovery (the sweeper, a hand-off) may go unclaimed before
    the sweeper sends another: continuations are taken first, so a copy waits only for a
    free slot; a longer silence means it was lost (a worker that stopped with it fetched),
    or every slot is busy, where an extra copy costs nothing but a no-op claim."""
    return max(2 * stale_after_s, 30.0)


@dataclass(frozen=True)
class LogState:
    status: str | None
    attempt: int
    last_seq: int
    heartbeat_ms: int | None
    cancel_requested: bool
    task_id: str | None = None
    worker: str | None = None
    queued_ms: int | None = None
    sent: bool = False  # the web tier marked the first task sent
    resent_ms: int | None = None  # when recovery last sent a copy not yet claimed
    resends: int = 0  # recovery sends since the last claim
    pending_end: dict[str, Any] | None = None  # see ChunkLog.pend_end
    detach_ms: int | None = None  # the detach policy (None: continue)
    watched_end: bool = False  # a viewer was attached when the terminal event was written
    why: str | None = None  # why a cancel was asked, when not by a person ("abandoned")


def _log_state(raw: dict[str, str]) -> LogState:
    return LogState(
        status=raw.get("status"),
        attempt=int(raw.get("attempt", 0)),
        last_seq=int(raw.get("seq", 0)),
        heartbeat_ms=int(raw["hb"]) if raw.get("hb") else None,
        cancel_requested=raw.get("cancel") == "1",
        task_id=raw.get("task"),
        worker=raw.get("worker"),
        queued_ms=int(raw["qt"]) if raw.get("qt") else None,
        sent=bool(raw.get("sent")),
        detach_ms=int(raw["dp"]) if raw.get("dp") else None,
        watched_end=raw.get("ew") == "1",
        why=raw.get("why") or None,
        resent_ms=int(raw["rq"]) if raw.get("rq") else None,
        resends=int(raw.get("rqn", 0)),
        pending_end=json.loads(raw["end"]) if raw.get("end") else None,
    )


def _same(script: str) -> str:
    return script


# The fields of a stream's state that say where a queued answer stands (``place_in_state``).
PLACE_FIELDS = ("status", "seq", "qn", "qs")


def place_in_state(fields: Sequence[Any]) -> tuple[int, str] | None:
    """The queue notice in a state's ``PLACE_FIELDS``, with the log's last seq when it was
    given: only while the stream is queued and nothing was written since (None otherwise)."""
    status, seq, notice, at = fields
    if status != "queued" or notice is None or at != (seq or "0"):
        return None
    return int(at), str(notice)


class ChunkLog:
    """Append to and read from per-stream logs. Safe to share between threads/greenlets."""

    def __init__(
        self,
        client: RedisClient,
        *,
        retention_s: int = 3600,
        running_ttl_s: int = 86400,
        sharded: bool | None = None,
    ) -> None:
        """``sharded``: publish live events with sharded pub/sub (``SPUBLISH``); by default
        when ``client`` is a Redis Cluster of Redis 7 or later (``sharded_pubsub``), which
        is what the web tier's hub then listens to."""
        self.redis = client
        self.sharded = sharded_pubsub(client) if sharded is None else sharded
        live = scripts.sharded if self.sharded else _same
        # The same pool, without redis-py's XRANGE reply parsing (a dict per entry): catch-up
        # reads take the entries' fields as they come. (A cluster client parses them.)
        self._raw: redis.Redis | None = None
        if isinstance(client, redis.Redis):
            self._raw = redis.Redis(connection_pool=client.connection_pool)
            self._raw.set_response_callback("XRANGE", lambda reply, **_: reply)
        self.retention_s = retention_s
        self.running_ttl_s = running_ttl_s
        self._init = client.register_script(live(scripts.INIT))
        self._claim = client.register_script(live(scripts.CLAIM))
        self._append = client.register_script(live(scripts.APPEND))
        self._append_all = client.register_script(live(scripts.APPEND_ALL))
        self._heartbeat = client.register_script(live(scripts.HEARTBEAT))
        self._take_over = client.register_script(live(scripts.TAKE_OVER))
        self._release = client.register_script(live(scripts.RELEASE))
        self._mark_requeue = client.register_script(live(scripts.MARK_REQUEUE))
        self._mark_sent = client.register_script(live(scripts.MARK_SENT))
        self._pend_end = client.register_script(live(scripts.PEND_END))
        self._seal = client.register_script(live(scripts.SEAL))
        self._reopen = client.register_script(live(scripts.REOPEN))
        self._detach_status = client.register_script(live(scripts.DETACH_STATUS))
        self._queue_notice = client.register_script(live(scripts.QUEUE_NOTICE))

    @staticmethod
    def _keys(stream_id: str) -> list[str]:
        return [keys.state_key(stream_id), keys.log_key(stream_id)]

    # -- writer side -------------------------------------------------------------------------

    @staticmethod
    def _append_keys(stream_id: str, events: Sequence[Event]) -> list[str]:
        """The state and the log; and the viewers when the batch ends the stream (APPEND)."""
        out = [keys.state_key(stream_id), keys.log_key(stream_id)]
        return [*out, keys.viewers_key(stream_id)] if events[-1].terminal else out

    def init(self, stream_id: str, detach_after_s: int | None = None) -> None:
        """Mark a stream queued (new, or about to be retried), with its detach policy."""
        self._init(keys=self._keys(stream_id), args=self._init_args(detach_after_s))

    def init_call(self, stream_id: str, detach_after_s: int | None = None) -> ScriptCall:
        """``init`` as a call for ``run_together`` (the post sends it with the feed's events)."""
        script_keys = self._keys(stream_id)
        command = ["EVALSHA", self._init.sha, len(script_keys), *script_keys,
                   *self._init_args(detach_after_s)]  # fmt: skip
        return command, functools.partial(self.init, stream_id, detach_after_s)

    def _init_args(self, detach_after_s: int | None) -> list[int]:
        return [self.running_ttl_s, 0 if detach_after_s is None else detach_after_s * 1000]

    def claim(
        self,
        stream_id: str,
        task_id: str,
        stale_after_s: float,
        worker: str = "",
        min_attempt: int = 0,
        detach: bool = False,
    ) -> Claim:
        """Start a new attempt (numbered above ``min_attempt``) unless the stream is finished
        or a live attempt owns it; ``detach``: the stream has a detach policy, and one
        abandoned under it is claimed with the cancel flag."""
        viewers = [keys.viewers_key(stream_id)] if detach else []
        res = self._claim(
            keys=[*self._keys(stream_id), *viewers],
            args=[task_id, int(stale_after_s * 1000), self.running_ttl_s, worker, min_attempt],
        )
        return Claim(str(res[0]), int(res[1]), int(res[2]), bool(int(res[3])), int(res[4]))

    def append(self, stream_id: str, attempt: int, event: Event) -> bool:
        """Append one event as ``attempt``; see ``append_many``."""
        return self.append_many(stream_id, attempt, [event])

    def append_many(self, stream_id: str, attempt: int, events: Sequence[Event]) -> bool:
        """Append consecutive events as ``attempt`` in one atomic step (all or none) and
        publish them; return whether a cancel is pending.

        Raises StaleAttempt when this attempt no longer owns the stream.
        """
        reply = self._append(
            keys=self._append_keys(stream_id, events),
            args=self._append_args(attempt, events, stream_id),
        )
        return self.append_result(stream_id, attempt, reply)

    def append_command(self, stream_id: str, attempt: int, events: Sequence[Event]) -> list[Any]:
        """The ``append_many`` call as a command for a pipeline (the worker sends many
        streams' at once); read its reply with ``append_result``. A NoScriptError reply
        means the server lost the script: ``load_scripts`` and send again. (A redis-py
        Script on a pipeline would cost a SCRIPT EXISTS round trip on every execute.)"""
        script_keys = self._append_keys(stream_id, events)
        return [
            "EVALSHA",
            self._append.sha,
            len(script_keys),
            *script_keys,
            *self._append_args(attempt, events, stream_id),
        ]

    def append_all_command(self, work: Sequence[tuple[str, int, Sequence[Event]]]) -> list[Any]:
        """Many streams' ``append_many`` calls (stream id, attempt, events) as one command,
        one script call, on one Redis server (never a cluster); read its reply with
        ``append_all_replies``. Each stream's append is on its own (all of its events or
        none), as if it had been sent alone."""
        script_keys: list[str] = []
        args: list[str | int] = [self.running_ttl_s, self.retention_s]
        for stream_id, attempt, events in work:
            stream_keys = self._append_keys(stream_id, events)
            script_keys += stream_keys
            args += (len(stream_keys), keys.live_channel(stream_id), attempt, events[0].seq,
                     len(events))  # fmt: skip
            for event in events:
                args += (event.type, event.payload())
        return ["EVALSHA", self._append_all.sha, len(script_keys), *script_keys, *args]

    @staticmethod
    def append_all_replies(reply: Any, count: int) -> list[Any]:
        """The reply to ``append_all_command`` of ``count`` streams as a reply per stream,
        each what ``append_command``'s would have been (a ResponseError for a stream whose
        append failed; the whole call's error, a NoScriptError say, for every stream)."""
        if isinstance(reply, Exception):
            return [reply] * count
        return [ResponseError(str(r[1])) if r[0] == "error" else r for r in reply]

    def load_scripts(self) -> None:
        """Load the append scripts into the server (after a restart or a flush; on a
        cluster, into every master)."""
        self.redis.script_load(self._append.script)
        self.redis.script_load(self._append_all.script)

    @staticmethod
    def position_command(stream_id: str) -> list[Any]:
        """Read what an append's lost reply would have said (see ``append_outcome``)."""
        return ["HMGET", keys.state_key(stream_id), "attempt", "seq", "status", "cancel"]

    @staticmethod
    def append_outcome(state: Sequence[Any], attempt: int, first: int, last: int) -> str:
        """What became of an append of seqs ``first``..``last`` whose reply was lost, from the
        state read afterwards (the script is atomic: all of them or none): 'written' (with a
        pending cancel: 'written+cancel'), 'missing' (the log ends before them:
        right before, or earlier when a failover lost some of their predecessors too), 'stale'
        (another attempt owns the stream) or 'gone' (the state vanished: Redis lost data)."""
        owner, seq, status, cancel = state
        if owner is None or seq is None:
            return "gone"
        if int(owner) != attempt:
            return "stale"
        if int(seq) == last:
            return "written+cancel" if cancel == "1" else "written"
        if int(seq) < first and status == "running":
            return "missing"
        return "stale"

    @staticmethod
    def fenced_off(stream_id: str, attempt: int) -> StaleAttempt:
        return StaleAttempt(f"attempt {attempt} of stream {stream_id} was fenced off")

    @staticmethod
    def append_result(stream_id: str, attempt: int, reply: Any) -> bool:
        if reply[0] == "stale":
            raise ChunkLog.fenced_off(stream_id, attempt)
        if reply[0] == "behind":
            raise LogBehind(stream_id, int(reply[1]))
        return bool(int(reply[1]))

    def _append_args(
        self, attempt: int, events: Sequence[Event], stream_id: str
    ) -> list[str | int]:
        args: list[str | int] = [
            keys.live_channel(stream_id),
            attempt,
            self.running_ttl_s,
            self.retention_s,
            events[0].seq,
        ]
        for event in events:
            args += (event.type, event.payload())
        return args

    def heartbeat(self, stream_id: str, attempt: int, detach: bool = False) -> Beat:
        """Refresh the attempt's heartbeat. ``detach``: the stream has a detach policy; if
        nobody has watched it for that long, it gets the cancel flag (``abandoned``) here."""
        viewers = [keys.viewers_key(stream_id)] if detach else []
        res = int(self._heartbeat(keys=[keys.state_key(stream_id), *viewers], args=[attempt]))
        return Beat(owner=res > 0, cancel=res == 2, unwatched=res == 3)

    def detach_status(self, stream_id: str) -> DetachStatus:
        """The detach policy and its countdown, by Redis's clock."""
        now, policy, since = self._detach_status(
            keys=[keys.state_key(stream_id), keys.viewers_key(stream_id)]
        )
        return DetachStatus(int(now), None if int(policy) < 0 else int(policy),
                            None if int(since) < 0 else int(since))  # fmt: skip

    def cancel(self, stream_id: str, stale_after_s: float) -> tuple[str, int, int]:
        """Request a cancel: ('requested' | 'taken' | 'finished', attempt, last seq). With
        'taken' the caller now owns the stream as ``attempt`` and must end it."""
        return self.take_over(stream_id, stale_after_s, cancel=True)

    def take_over(
        self, stream_id: str, stale_after_s: float, *, cancel: bool = False
    ) -> tuple[str, int, int]:
        """Own a stream nobody is writing, to end it: ('taken', attempt, last seq), or
        'requested' (a live writer has it; with ``cancel`` it was asked to stop) or
        'finished'."""
        res = self._take_over(
            keys=self._keys(stream_id),
            args=[int(stale_after_s * 1000), self.running_ttl_s, int(cancel)],
        )
        return str(res[0]), int(res[1]), int(res[2])

    def pend_end(
        self,
        stream_id: str,
        attempt: int,
        status: str,
        error: dict[str, str] | None,
        usage: dict[str, Any] | None = None,
        reason: str | None = None,
    ) -> bool:
        """Leave the end of an answer whose pieces are all in the log for the sweeper to
        store (SQL was unreachable); False when ``attempt`` no longer owns the stream."""
        end = json.dumps({"status": status, "error": error, "usage": usage, "reason": reason})
        return bool(self._pend_end(keys=[keys.state_key(stream_id)], args=[attempt, end]))

    def queue_notice(self, stream_id: str, notice: str) -> bool:
        """While the stream is queued: keep ``notice`` (where it stands in line, as JSON)
        for viewers that attach and publish it to those attached; False when it is no
        longer queued."""
        channel = keys.live_channel(stream_id)
        return bool(self._queue_notice(keys=[keys.state_key(stream_id)], args=[channel, notice]))

    def queue_place(self, stream_id: str) -> tuple[int, str] | None:
        """The last queue notice of a stream that is still queued, with the log's last seq
        when it was given (None: not queued, or no place known yet)."""
        return place_in_state(self.redis.hmget(keys.state_key(stream_id), *PLACE_FIELDS))

    def release(self, stream_id: str, attempt: int) -> bool:
        """Give the stream up (worker shutting down): the next claim may start at once, and
        the sweeper sends no copy of its own while the caller's is on its way."""
        return bool(self._release(keys=[keys.state_key(stream_id)], args=[attempt]))

    def mark_requeue(
        self,
        stream_id: str,
        stale_after_s: float,
        queued_grace_s: float,
        max_attempts: int = 1_000_000,
        unsent_grace_s: float | None = None,
        resend_wait_s: float | None = None,
    ) -> int:
        """REQUEUE_SEND when the stream's task should be sent again now (recorded as sent),
        REQUEUE_OVER_BUDGET when it should but the budget is spent, else REQUEUE_NO. A
        stream committed but never marked sent waits ``unsent_grace_s`` (default: the stale
        period) instead of the queued grace; a copy sent by recovery is given
        ``resend_wait_s`` (default ``resend_wait(stale_after_s)``), then twice as long..."""
        unsent = stale_after_s if unsent_grace_s is None else unsent_grace_s
        wait = resend_wait(stale_after_s) if resend_wait_s is None else resend_wait_s
        args = [
            int(stale_after_s * 1000), int(queued_grace_s * 1000), self.running_ttl_s,
            max_attempts, int(unsent * 1000), int(wait * 1000),
        ]  # fmt: skip
        return int(self._mark_requeue(keys=[keys.state_key(stream_id)], args=args))

    def forget_send(self, stream_id: str) -> None:
        """A recovery send marked by ``mark_requeue`` did not reach the broker: let the
        next sweep try again without waiting for the marked copy."""
        self.redis.hdel(keys.state_key(stream_id), "rq")

    def mark_sent(self, stream_id: str) -> None:
        """The web tier sent a new stream's task (see ``mark_requeue``)."""
        self._mark_sent(keys=[keys.state_key(stream_id)])

    def seal(self, stream_id: str, events: list[Event], stale_after_s: float) -> str:
        """End a stream whose writer died after storing its end in SQL: 'sealed', 'busy',
        'finished' or 'moved' (the log grew past the terminal event's seq; nothing was
        written). ``events`` are what SQL has after the log's last entry, the terminal
        event last."""
        final = STATUS_FOR_TERMINAL[events[-1].type]
        args: list[str | int] = [
            keys.live_channel(stream_id), int(stale_after_s * 1000), self.retention_s, final,
        ]  # fmt: skip
        for event in events:
            args += [event.seq, event.type, event.payload()]
        return str(self._seal(keys=self._keys(stream_id), args=args))

    def reopen(
        self, stream_id: str, task_id: str, detach_after_s: int | None = None
    ) -> tuple[str, int, int]:
        """Queue a finished stream again: ('reopened', resumed seq, next attempt)."""
        detach_ms = 0 if detach_after_s is None else detach_after_s * 1000
        args: list[str | int] = [
            keys.live_channel(stream_id),
            self.running_ttl_s,
            task_id,
            detach_ms,
        ]
        res = self._reopen(keys=self._keys(stream_id), args=args)
        return str(res[0]), int(res[1]), int(res[2])

    def reseed(self, stream_id: str, events: list[Event], status: str, attempt: int) -> None:
        """Rebuild an expired log from SQL (before a retry), unless it exists again. (Its
        keys share a slot, so this is one node's transaction on a cluster too.)"""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.watch(keys.log_key(stream_id))
            if pipe.exists(keys.log_key(stream_id)):
                return
            pipe.multi()
            for event in events:
                pipe.xadd(
                    keys.log_key(stream_id),
                    {"t": event.type, "d": event.payload()},
                    id=f"0-{event.seq}",
                )
            pipe.hset(
                keys.state_key(stream_id),
                mapping={"status": status, "attempt": attempt, "seq": events[-1].seq},
            )
            pipe.expire(keys.log_key(stream_id), self.retention_s)
            pipe.expire(keys.state_key(stream_id), self.retention_s)
            pipe.execute()

    # -- reader side -------------------------------------------------------------------------

    def read(self, stream_id: str, after: int, count: int) -> list[Event]:
        """Events with ``seq > after``, oldest first, at most ``count``."""
        entries = cast(
            list[tuple[str, dict[str, str]]],
            self.redis.xrange(keys.log_key(stream_id), f"0-{after + 1}", "+", count=count),
        )
        return [Event.from_entry(eid, fields) for eid, fields in entries]

    def read_columns(self, stream_id: str, after: int, last: int) -> tuple[list[str], list[str]]:
        """The types and data of the events ``after`` + 1 .. ``last`` present now (a prefix
        of them when the log ends sooner)."""
        if self._raw is None:  # a cluster client: its replies come parsed
            events = self.read(stream_id, after, last - after)
            return [e.type for e in events], [e.payload() for e in events]
        entries: list[tuple[str, list[str]]] = self._raw.execute_command(  # type: ignore[no-untyped-call]
            "XRANGE", keys.log_key(stream_id), f"0-{after + 1}", f"0-{last}"
        )
        if not entries:
            return [], []
        if entries[-1][0] != f"0-{after + len(entries)}" or entries[0][1][0] != "t":
            events = self.read(stream_id, after, last - after)
            return [e.type for e in events], [e.payload() for e in events]
        # Every script (and reseed) writes the fields as t, then d.
        return [f[1] for _, f in entries], [f[3] for _, f in entries]

    def iter_from(self, stream_id: str, after: int, batch: int = 500) -> Iterator[Event]:
        """Every event with ``seq > after`` present now, read in batches."""
        while True:
            events = self.read(stream_id, after, batch)
            yield from events
            if len(events) < batch:
                return
            after = events[-1].seq

    def forget(self, stream_ids: Sequence[str]) -> None:
        """Delete streams' logs and states (their chats are being deleted)."""
        if stream_ids:
            doomed = [k for sid in stream_ids for k in (*self._keys(sid), keys.viewers_key(sid))]
            self.redis.delete(*doomed)

    def exists(self, stream_id: str) -> bool:
        return bool(self.redis.exists(keys.log_key(stream_id)))

    def last_seq(self, stream_id: str) -> int:
        entries = cast(
            list[tuple[str, Any]], self.redis.xrevrange(keys.log_key(stream_id), "+", "-", count=1)
        )
        return int(entries[0][0].rsplit("-", 1)[1]) if entries else 0

    def state(self, stream_id: str) -> LogState:
        return _log_state(cast(dict[str, str], self.redis.hgetall(keys.state_key(stream_id))))

    def states(self, stream_ids: Sequence[str]) -> tuple[int, list[LogState]]:
        """Redis's clock (ms) and the state of each stream, in one round trip (on a cluster:
        the clock of one node, then one round trip per node)."""
        if isinstance(self.redis, RedisCluster):
            now_ms = server_time_ms(self.redis)
            cluster_pipe = self.redis.pipeline(transaction=False)  # type: ignore[no-untyped-call]
            for stream_id in stream_ids:
                cluster_pipe.hgetall(keys.state_key(stream_id))
            return now_ms, [_log_state(r) for r in cluster_pipe.execute()]
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        for stream_id in stream_ids:
            pipe.hgetall(keys.state_key(stream_id))
        replies = pipe.execute()
        seconds, micros = replies[0]
        return int(seconds) * 1000 + int(micros) // 1000, [_log_state(r) for r in replies[1:]]

    def text(self, stream_id: str, upto: int) -> tuple[str, Layout]:
        """The concatenated chunk text of events up to ``upto``, and their seq layout."""
        parts: list[str] = []
        layout: Layout = []
        length = 0
        for event in self.iter_from(stream_id, 0):
            if event.seq > upto:
                break
            parts.append(event.text)
            length += len(event.text)
            layout.append(layout_item(event, length))
        return "".join(parts), layout
