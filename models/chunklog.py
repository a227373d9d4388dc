"""The durable chunk log in Redis: one Redis Stream per stream ID, written through Lua.

Writers (workers) append through ``append_many``, an atomic script that refuses a stale
attempt, reports a pending cancel in the same round trip and publishes what it added on the
stream's live channel. Readers (web) use ``read``. Entry IDs are ``0-<seq>``, so Redis
itself refuses an entry that is not above the last one: the natural fence against a
duplicate writer. The scripts are in ``models.scripts``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis

from models import keys, scripts
from models.events import STATUS_FOR_TERMINAL, Event
from models.exceptions import StaleAttempt
from models.store import Layout, layout_item


@dataclass(frozen=True)
class Claim:
    result: str  # claimed | busy | finished
    attempt: int
    last_seq: int
    cancel_requested: bool


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
    )


class ChunkLog:
    """Append to and read from per-stream logs. Safe to share between threads/greenlets."""

    def __init__(
        self, client: redis.Redis, *, retention_s: int = 3600, running_ttl_s: int = 86400
    ) -> None:
        self.redis = client
        # The same pool, without redis-py's XRANGE reply parsing (a dict per entry): catch-up
        # reads take the entries' fields as they come.
        self._raw = redis.Redis(connection_pool=client.connection_pool)
        self._raw.set_response_callback("XRANGE", lambda reply, **_: reply)
        self.retention_s = retention_s
        self.running_ttl_s = running_ttl_s
        self._init = client.register_script(scripts.INIT)
        self._claim = client.register_script(scripts.CLAIM)
        self._append = client.register_script(scripts.APPEND)
        self._heartbeat = client.register_script(scripts.HEARTBEAT)
        self._cancel = client.register_script(scripts.CANCEL)
        self._release = client.register_script(scripts.RELEASE)
        self._mark_requeue = client.register_script(scripts.MARK_REQUEUE)
        self._seal = client.register_script(scripts.SEAL)
        self._reopen = client.register_script(scripts.REOPEN)

    @staticmethod
    def _keys(stream_id: str) -> list[str]:
        return [keys.state_key(stream_id), keys.log_key(stream_id)]

    # -- writer side -------------------------------------------------------------------------

    def init(self, stream_id: str) -> None:
        """Mark a stream queued (new, or about to be retried)."""
        self._init(keys=self._keys(stream_id), args=[self.running_ttl_s])

    def claim(
        self,
        stream_id: str,
        task_id: str,
        stale_after_s: float,
        worker: str = "",
        min_attempt: int = 0,
    ) -> Claim:
        """Start a new attempt (numbered above ``min_attempt``) unless the stream is finished
        or a live attempt owns it."""
        res = self._claim(
            keys=self._keys(stream_id),
            args=[task_id, int(stale_after_s * 1000), self.running_ttl_s, worker, min_attempt],
        )
        return Claim(str(res[0]), int(res[1]), int(res[2]), bool(int(res[3])))

    def append(self, stream_id: str, attempt: int, event: Event) -> bool:
        """Append one event as ``attempt``; see ``append_many``."""
        return self.append_many(stream_id, attempt, [event])

    def append_many(self, stream_id: str, attempt: int, events: Sequence[Event]) -> bool:
        """Append consecutive events as ``attempt`` in one atomic step (all or none) and
        publish them; return whether a cancel is pending.

        Raises StaleAttempt when this attempt no longer owns the stream.
        """
        reply = self._append(
            keys=self._keys(stream_id), args=self._append_args(attempt, events, stream_id)
        )
        return self.append_result(stream_id, attempt, reply)

    def append_command(self, stream_id: str, attempt: int, events: Sequence[Event]) -> list[Any]:
        """The ``append_many`` call as a command for a pipeline (the worker sends many
        streams' at once); read its reply with ``append_result``. A NoScriptError reply
        means the server lost the script: ``load_scripts`` and send again. (A redis-py
        Script on a pipeline would cost a SCRIPT EXISTS round trip on every execute.)"""
        return [
            "EVALSHA",
            self._append.sha,
            2,
            *self._keys(stream_id),
            *self._append_args(attempt, events, stream_id),
        ]

    def load_scripts(self) -> None:
        """Load the append script into the server (after a restart or a flush)."""
        self.redis.script_load(self._append.script)

    @staticmethod
    def position_command(stream_id: str) -> list[Any]:
        """Read what an append's lost reply would have said (see ``append_outcome``)."""
        return ["HMGET", keys.state_key(stream_id), "attempt", "seq", "status", "cancel"]

    @staticmethod
    def append_outcome(state: Sequence[Any], attempt: int, first: int, last: int) -> str:
        """What became of an append of seqs ``first``..``last`` whose reply was lost, from the
        state read afterwards (the script is atomic: all of them or none): 'written' (with a
        pending cancel: 'written+cancel'), 'missing' (the log ends right before them), 'stale'
        (another attempt owns the stream) or 'gone' (the state vanished: Redis lost data)."""
        owner, seq, status, cancel = state
        if owner is None or seq is None:
            return "gone"
        if int(owner) != attempt:
            return "stale"
        if int(seq) == last:
            return "written+cancel" if cancel == "1" else "written"
        if int(seq) == first - 1 and status == "running":
            return "missing"
        return "stale"

    @staticmethod
    def fenced_off(stream_id: str, attempt: int) -> StaleAttempt:
        return StaleAttempt(f"attempt {attempt} of stream {stream_id} was fenced off")

    @staticmethod
    def append_result(stream_id: str, attempt: int, reply: Any) -> bool:
        if reply[0] == "stale":
            raise ChunkLog.fenced_off(stream_id, attempt)
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

    def heartbeat(self, stream_id: str, attempt: int) -> tuple[bool, bool]:
        """Refresh the attempt's heartbeat: (still the owner, cancel requested)."""
        res = int(self._heartbeat(keys=[keys.state_key(stream_id)], args=[attempt]))
        return res > 0, res == 2

    def cancel(self, stream_id: str, stale_after_s: float) -> tuple[str, int, int]:
        """Request a cancel: ('requested' | 'taken' | 'finished', attempt, last seq). With
        'taken' the caller now owns the stream as ``attempt`` and must end it."""
        res = self._cancel(
            keys=self._keys(stream_id), args=[int(stale_after_s * 1000), self.running_ttl_s]
        )
        return str(res[0]), int(res[1]), int(res[2])

    def release(self, stream_id: str, attempt: int) -> bool:
        """Give the stream up (worker shutting down): the next claim may start at once."""
        return bool(self._release(keys=[keys.state_key(stream_id)], args=[attempt]))

    def mark_requeue(self, stream_id: str, stale_after_s: float, queued_grace_s: float) -> bool:
        """True (once per stale period) when the stream's task should be sent again."""
        return bool(
            self._mark_requeue(
                keys=[keys.state_key(stream_id)],
                args=[int(stale_after_s * 1000), int(queued_grace_s * 1000), self.running_ttl_s],
            )
        )

    def seal(self, stream_id: str, events: list[Event], stale_after_s: float) -> str:
        """End a stream whose writer died after storing its end in SQL: 'sealed', 'busy' or
        'finished'. ``events`` are what SQL has after the log's last entry."""
        final = STATUS_FOR_TERMINAL[events[-1].type]
        args: list[str | int] = [
            keys.live_channel(stream_id), int(stale_after_s * 1000), self.retention_s, final,
        ]  # fmt: skip
        for event in events:
            args += [event.seq, event.type, event.payload()]
        return str(self._seal(keys=self._keys(stream_id), args=args))

    def reopen(self, stream_id: str, task_id: str) -> tuple[str, int, int]:
        """Queue a finished stream again: ('reopened', resumed seq, next attempt)."""
        args: list[str | int] = [keys.live_channel(stream_id), self.running_ttl_s, task_id]
        res = self._reopen(keys=self._keys(stream_id), args=args)
        return str(res[0]), int(res[1]), int(res[2])

    def reseed(self, stream_id: str, events: list[Event], status: str, attempt: int) -> None:
        """Rebuild an expired log from SQL (before a retry), unless it exists again."""
        with self.redis.pipeline() as pipe:
            pipe.watch(keys.log_key(stream_id))  # type: ignore[no-untyped-call]
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
        """Redis's clock (ms) and the state of each stream, in one round trip."""
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
