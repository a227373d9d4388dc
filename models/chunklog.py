"""The durable chunk log in Redis: one Redis Stream per stream ID, written through Lua.

Writers (workers) append through ``append``, an atomic script that refuses a stale attempt
and reports a pending cancel in the same round trip. Readers (web) use ``read``. Entry IDs
are ``0-<seq>``, so Redis itself refuses an entry that is not above the last one: the
natural fence against a duplicate writer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import redis

from models import keys
from models.events import STATUS_FOR_TERMINAL, Event
from models.exceptions import StaleAttempt
from models.store import Layout, layout_item

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_LAST_SEQ = """
local function last_seq(log)
  local e = redis.call('XREVRANGE', log, '+', '-', 'COUNT', 1)
  if e[1] then return tonumber(string.match(e[1][1], '-(%d+)$')) end
  return 0
end
local function finished(status)
  return status == 'done' or status == 'cancelled' or status == 'failed'
end
"""

# KEYS: state, log. ARGV: running ttl.
_INIT = (
    _NOW_MS
    + """
redis.call('HSET', KEYS[1], 'status', 'queued', 'qt', now)
redis.call('HDEL', KEYS[1], 'cancel', 'hb', 'task', 'rq')
redis.call('EXPIRE', KEYS[1], ARGV[1])
return redis.call('HGET', KEYS[1], 'attempt') or '0'
"""
)

# KEYS: state, log. ARGV: task id, stale ms, running ttl, worker name, last attempt in SQL.
# The attempt never goes back below SQL's, even if Redis lost the state hash.
_CLAIM = (
    _NOW_MS
    + _LAST_SEQ
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'attempt', 'hb', 'cancel')
if finished(st[1]) then return {'finished', tonumber(st[2] or '0'), 0, 0} end
if st[1] == 'running' and st[3] and (now - tonumber(st[3])) < tonumber(ARGV[2]) then
  return {'busy', tonumber(st[2] or '0'), 0, 0}
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
if attempt <= tonumber(ARGV[5]) then
  attempt = tonumber(ARGV[5]) + 1
  redis.call('HSET', KEYS[1], 'attempt', attempt)
end
redis.call('HSET', KEYS[1], 'status', 'running', 'hb', now, 'task', ARGV[1], 'worker', ARGV[4])
redis.call('HDEL', KEYS[1], 'rq')
redis.call('EXPIRE', KEYS[1], ARGV[3])
local cancel = 0
if st[4] == '1' then cancel = 1 end
return {'claimed', attempt, last_seq(KEYS[2]), cancel}
"""
)

# KEYS: state, log. ARGV: attempt, seq, type, data, final status or '', running ttl, retention.
_APPEND = (
    _NOW_MS
    + """
local st = redis.call('HMGET', KEYS[1], 'attempt', 'status', 'cancel')
if st[1] ~= ARGV[1] or st[2] ~= 'running' then return {'stale', 0} end
local added = redis.pcall('XADD', KEYS[2], '0-' .. ARGV[2], 't', ARGV[3], 'd', ARGV[4])
if type(added) == 'table' and added.err then return {'stale', 0} end
redis.call('HSET', KEYS[1], 'hb', now, 'seq', ARGV[2])
local ttl = ARGV[6]
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[1], 'status', ARGV[5])
  ttl = ARGV[7]
end
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('EXPIRE', KEYS[2], ttl)
local cancel = 0
if st[3] == '1' then cancel = 1 end
return {'ok', cancel}
"""
)

# KEYS: state. ARGV: attempt.
_HEARTBEAT = (
    _NOW_MS
    + """
local st = redis.call('HMGET', KEYS[1], 'attempt', 'status', 'cancel')
if st[1] ~= ARGV[1] or st[2] ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'hb', now)
if st[3] == '1' then return 2 end
return 1
"""
)

# KEYS: state, log. ARGV: stale ms, running ttl.
# A running attempt with a live heartbeat gets the cancel flag and ends the stream itself at
# its next append. Nobody is writing a queued stream (or one whose writer is dead), so the
# canceller takes it over as a new attempt (fencing off any late worker) and ends it like a
# writer would: final text to SQL first, then the cancelled event. If the canceller dies in
# between, the sweeper's next attempt sees the cancel flag and ends it.
_CANCEL = (
    _NOW_MS
    + _LAST_SEQ
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'hb')
if finished(st[1]) then return {'finished', 0, 0} end
redis.call('HSET', KEYS[1], 'cancel', '1')
if st[1] == 'running' and st[2] and (now - tonumber(st[2])) < tonumber(ARGV[1]) then
  return {'requested', 0, 0}
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'hb', now)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return {'taken', attempt, last_seq(KEYS[2])}
"""
)


# KEYS: state. ARGV: attempt. Make a live attempt's heartbeat stale at once (hand-off).
_RELEASE = """
local st = redis.call('HMGET', KEYS[1], 'attempt', 'status')
if st[1] ~= ARGV[1] or st[2] ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'hb', 0)
return 1
"""

# KEYS: state. ARGV: stale ms, queued grace ms, running ttl.
# Decide (once per stale period) that a stream needs its task sent again: its writer's
# heartbeat is stale, it has sat queued too long, or Redis lost its state entirely.
_MARK_REQUEUE = (
    _NOW_MS
    + _LAST_SEQ
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'hb', 'qt', 'rq')
if finished(st[1]) then return 0 end
if st[1] == 'running' and st[2] and (now - tonumber(st[2])) < tonumber(ARGV[1]) then return 0 end
if st[1] == 'queued' and st[3] and (now - tonumber(st[3])) < tonumber(ARGV[2]) then return 0 end
if st[4] and (now - tonumber(st[4])) < tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'rq', now)
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""
)

# KEYS: state, log. ARGV: stale ms, retention, final status, then seq/type/data triples.
# Take over a stream whose writer is dead and end it with the given events (from SQL).
_SEAL = (
    _NOW_MS
    + _LAST_SEQ
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'hb')
if finished(st[1]) then return 'finished' end
if st[1] == 'running' and st[2] and (now - tonumber(st[2])) < tonumber(ARGV[1]) then
  return 'busy'
end
local last = last_seq(KEYS[2])
for i = 4, #ARGV, 3 do
  if tonumber(ARGV[i]) > last then
    redis.call('XADD', KEYS[2], '0-' .. ARGV[i], 't', ARGV[i + 1], 'd', ARGV[i + 2])
  end
end
redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'seq', ARGV[#ARGV - 2])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 'sealed'
"""
)

# KEYS: state, log. ARGV: running ttl, task id.
# Admin retry: a finished stream is queued again, after a "resumed" marker event.
_REOPEN = (
    _NOW_MS
    + _LAST_SEQ
    + """
local st = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if not finished(st[1]) then return {'not_finished', 0, 0} end
local seq = last_seq(KEYS[2]) + 1
local next_attempt = tonumber(st[2] or '0') + 1
redis.call('XADD', KEYS[2], '0-' .. seq, 't', 'resumed', 'd', next_attempt)
redis.call('HSET', KEYS[1], 'status', 'queued', 'task', ARGV[2], 'qt', now, 'seq', seq)
redis.call('HDEL', KEYS[1], 'cancel', 'hb', 'rq')
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return {'reopened', seq, next_attempt}
"""
)


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


class ChunkLog:
    """Append to and read from per-stream logs. Safe to share between threads/greenlets."""

    def __init__(
        self, client: redis.Redis, *, retention_s: int = 3600, running_ttl_s: int = 86400
    ) -> None:
        self.redis = client
        self.retention_s = retention_s
        self.running_ttl_s = running_ttl_s
        self._init = client.register_script(_INIT)
        self._claim = client.register_script(_CLAIM)
        self._append = client.register_script(_APPEND)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._cancel = client.register_script(_CANCEL)
        self._release = client.register_script(_RELEASE)
        self._mark_requeue = client.register_script(_MARK_REQUEUE)
        self._seal = client.register_script(_SEAL)
        self._reopen = client.register_script(_REOPEN)

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
        """Append one event as ``attempt``; return whether a cancel is pending.

        Raises StaleAttempt when this attempt no longer owns the stream.
        """
        final = STATUS_FOR_TERMINAL.get(event.type, "")
        res = self._append(
            keys=self._keys(stream_id),
            args=[
                attempt,
                event.seq,
                event.type,
                event.payload(),
                final,
                self.running_ttl_s,
                self.retention_s,
            ],
        )
        if res[0] == "stale":
            raise StaleAttempt(f"attempt {attempt} of stream {stream_id} was fenced off")
        return bool(int(res[1]))

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
        args: list[str | int] = [int(stale_after_s * 1000), self.retention_s, final]
        for event in events:
            args += [event.seq, event.type, event.payload()]
        return str(self._seal(keys=self._keys(stream_id), args=args))

    def reopen(self, stream_id: str, task_id: str) -> tuple[str, int, int]:
        """Queue a finished stream again: ('reopened', resumed seq, next attempt)."""
        res = self._reopen(keys=self._keys(stream_id), args=[self.running_ttl_s, task_id])
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
        raw = cast(dict[str, str], self.redis.hgetall(keys.state_key(stream_id)))
        return LogState(
            status=raw.get("status"),
            attempt=int(raw.get("attempt", 0)),
            last_seq=int(raw.get("seq", 0)),
            heartbeat_ms=int(raw["hb"]) if raw.get("hb") else None,
            cancel_requested=raw.get("cancel") == "1",
            task_id=raw.get("task"),
            worker=raw.get("worker"),
        )

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
