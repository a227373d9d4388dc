"""One hub per web process: one pub/sub connection brings every watched stream's new events.

The chunk log's scripts publish what they add on the stream's live channel in the same
atomic step as the write. While a stream has viewers in this process, the hub subscribes to
its channel, decodes each message once into a ``Batch`` and hands that batch to every
subscription of the stream. A subscription is a mailbox: batches are appended and its viewer
is woken once, however many events they carry. A viewer more than ``queue_size`` events
behind is not buffered further: it is flagged and re-reads the log at its own pace.

Pub/sub is not durable, the log is. Whenever the hub may have missed a message (a channel
was just subscribed, the connection was lost and made again) the affected subscriptions are
flagged and their viewers re-read the log. A periodic check compares each watched stream's
last seq and writer heartbeat in Redis with what the hub has seen, so a missed event or a
dead writer is noticed within ``check_interval_s`` even on a quiet stream.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import selectors
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import hiredis
import redis
from redis.cluster import RedisCluster
from redis.connection import Connection
from redis.exceptions import RedisClusterException

from models import keys
from models.chunklog import PLACE_FIELDS, place_in_state
from models.events import TERMINAL_TYPES
from models.redisconn import (
    RedisClient,
    node_pool,
    server_time_ms,
    sharded_pubsub,
    subscriber_pool,
)
from ops.geventfix import fast_lock
from web.errors import UNAVAILABLE_ERRORS
from web.frames import Batch, Notice
from web.instruments import HUB_DISPATCH, HUB_LAGGED

log = logging.getLogger("relay.hub")
# Writes a batch to a viewer's socket without waiting; False when it could not.
DirectWrite = Callable[[Batch], bool]
FINISHED = frozenset({"done", "cancelled", "failed"})


class Subscription:
    """A viewer's mailbox for one stream."""

    __slots__ = ("_batches", "_check", "_lock", "_notice", "_parked_at", "_pending", "_reread",
                 "_told", "direct", "limit", "stream_id", "wake")  # fmt: skip

    def __init__(self, stream_id: str, wake: threading.Event, limit: int) -> None:
        self.stream_id = stream_id
        self.wake = wake
        self.limit = limit
        self._batches: list[Batch] = []
        self._pending = 0
        self._reread = False  # read the log: something may not have been offered
        self._check = False  # also ask whether the writer is still there
        self._lock = fast_lock()  # taken for every batch the hub writes to a waiting viewer
        # Set by a viewer that lets the hub write to its socket directly while it waits.
        self.direct: DirectWrite | None = None
        self._parked_at: int | None = None  # the viewer's cursor while it waits
        self._told: str | None = None  # the queue notice the viewer last sent, while it waits
        self._notice: Notice | None = None  # the latest, not yet taken

    def park(self, cursor: int, told: str | None = None) -> None:
        """The viewer waits, with everything up to ``cursor`` sent (and ``told``, the queue
        notice it last sent): until it wakes, the hub may write the next batches to its
        socket itself (no wake-up, no copy)."""
        with self._lock:
            if not self._batches and not self._reread:
                self._parked_at, self._told = cursor, told

    def has(self, seq: int, place: str | None) -> bool:
        """Whether the viewer waits with everything the log had at ``seq`` and with the
        stream's current queue notice ``place`` (if any): nothing from before then to
        re-read."""
        with self._lock:
            return (
                self._parked_at == seq
                and not self._batches
                and not self._reread
                and (place is None or place == self._told)
            )

    def unpark(self) -> int | None:
        """The viewer is awake again: the cursor as the hub left it (None: unchanged)."""
        with self._lock:
            cursor, self._parked_at = self._parked_at, None
        return cursor

    def try_direct(self, batch: Batch) -> bool:
        """Write ``batch`` to the waiting viewer's socket now, if it follows what the viewer
        has and needs no waiting; a terminal event always goes the normal way (the viewer
        decides when the stream ends)."""
        if batch.types[-1] in TERMINAL_TYPES:
            return False
        return self.direct_after(batch, batch.first - 1, batch.last)

    def direct_after(self, batch: Batch, after: int, last: int) -> bool:
        """``try_direct`` for a batch without a terminal event, running from ``after`` + 1
        to ``last`` (the hub works those out once for all the stream's viewers)."""
        with self._lock:
            if self._parked_at != after or self.direct is None or not self.direct(batch):
                return False
            self._parked_at = last
        return True

    def offer(self, batch: Batch) -> None:
        with self._lock:
            if self._pending + len(batch) > self.limit:
                if not self._reread:
                    HUB_LAGGED.inc()
                self._reread = True  # dropped: the viewer reads the log at its own pace
            else:
                self._batches.append(batch)
                self._pending += len(batch)
        self.wake.set()

    def notice(self, notice: Notice) -> None:
        """A queue notice for the viewer: only the latest counts (a newer place replaces
        one not yet sent)."""
        with self._lock:
            self._notice = notice  # the viewer sends it itself (never a direct write)
        self.wake.set()

    def take_notice(self) -> Notice | None:
        with self._lock:
            notice, self._notice = self._notice, None
        return notice

    def flag(self, check: bool = False) -> None:
        """Something may have been missed: the viewer re-reads the log (``check``: and
        finishes from SQL if the writer is gone)."""
        with self._lock:
            self._reread = True
            self._check = self._check or check
        self.wake.set()

    def take(self) -> tuple[list[Batch], bool, bool]:
        """The batches offered since the last call, whether to re-read the log, and whether
        to check on the writer."""
        with self._lock:
            out = self._batches, self._reread, self._check
            self._batches, self._pending, self._reread, self._check = [], 0, False, False
        return out


@dataclass
class _Channel:
    subs: set[Subscription] = field(default_factory=set)
    confirmed: bool = False  # Redis has acknowledged the SUBSCRIBE
    seen: int = 0  # the highest seq this process knows the viewers could have


class Hub:
    """Follow every stream that has viewers in this process over one pub/sub connection.

    Only the hub's own thread touches that connection. A viewer's thread changes the set of
    watched streams and rings the hub's doorbell (a PUBLISH on the hub's own channel, which
    the connection is subscribed to); the hub thread then subscribes and unsubscribes the
    difference between what is watched and what it has subscribed.
    """

    def __init__(
        self,
        redis_url: str,
        control: RedisClient,
        *,
        queue_size: int = 2048,
        check_interval_s: float = 5.0,
        stale_ms: float = 8000.0,
        presence_ttl_s: int = 86400,
    ) -> None:
        self.redis_url = redis_url
        self.control = control  # pool client: the doorbell and the periodic check
        self.queue_size = queue_size
        self.check_interval_s = check_interval_s
        self.stale_ms = stale_ms
        self.hub_id = uuid.uuid4().hex
        self.doorbell = keys.hub_channel(self.hub_id)
        # Presence (the detach policy's input): while this process has viewers of a stream,
        # its member in the stream's viewers set holds a lease renewed at every check; it
        # outlives a missed check, and a process that dies stops renewing it.
        self.presence_lease_ms = int(check_interval_s * 2500)
        self.presence_ttl_ms = presence_ttl_s * 1000
        self._clock_offset_ms = 0  # Redis's clock minus ours, measured at every check
        self._channels: dict[str, _Channel] = {}
        self._lock = threading.Lock()  # guards _channels and _rung
        self._rung = False
        self._subscribed: set[str] = set()  # stream IDs, owned by the hub thread
        self._conn: Connection | None = None
        self._reader: PushReader | None = None
        self._last_reply = 0.0
        self._dispatched = 0
        self._confirming: list[str] = []  # streams confirmed in the replies being handled
        self._thread: threading.Thread | None = None
        self._stopping = False
        # On a cluster: which node the next connection goes to (hubs start at random places,
        # and a failed connection moves on to the next node).
        self._pick = random.randrange(1 << 16)
        self._failed = False

    # -- viewers -------------------------------------------------------------------------------

    def subscribe(self, stream_id: str, cursor: int, wake: threading.Event) -> Subscription:
        """Watch ``stream_id`` for a viewer that has everything up to ``cursor``; ``wake`` is
        set whenever the subscription has something for it. The viewer must read the log
        once after this call: events written before the hub listens are not offered."""
        sub = Subscription(stream_id, wake, self.queue_size)
        with self._lock:
            channel = self._channels.get(stream_id)
            added = channel is None
            if channel is None:
                channel = self._channels[stream_id] = _Channel(seen=cursor)
            channel.subs.add(sub)
            self._ensure_thread()
        if added:
            self._ring()
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            channel = self._channels.get(sub.stream_id)
            if channel is None:
                return
            channel.subs.discard(sub)
            if channel.subs:
                return
            del self._channels[sub.stream_id]
        self._ring()

    def wake_all(self) -> None:
        """Wake every viewer (the process is shutting down)."""
        for sub in self._all_subs():
            sub.wake.set()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "streams": len(self._channels),
                "subscriptions": sum(len(c.subs) for c in self._channels.values()),
            }

    def stop(self) -> None:
        self._stopping = True
        self._ring(force=True)  # the hub thread wakes, sees _stopping and closes
        with self._lock:
            watched = list(self._channels)
        self._presence((), watched)  # their viewers are leaving with this process

    def _ring(self, force: bool = False) -> None:
        """Ask the hub thread to bring its subscriptions in line (once until it does)."""
        with self._lock:
            if self._rung and not force:
                return
            self._rung = True
        try:
            self.control.publish(self.doorbell, "")
        except redis.RedisError:  # the hub thread reconciles when it reconnects anyway
            _warn_failure("hub doorbell failed")

    # -- the hub thread --------------------------------------------------------------------------

    def start(self) -> None:
        """Connect now rather than for the first viewer. Started by a viewer, the hub thread
        of a fresh process met the burst of viewers that follows a restart: it connected only
        once the burst had passed (11 s for 10,000 viewers attaching), so every viewer's
        subscription took effect late, and each of them read the log again then."""
        with self._lock:
            self._ensure_thread()

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="relay-hub", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            try:
                self._connect()
                backoff = 0.1
                if self._failed:
                    log.warning("hub reconnected to Redis")
                self._failed = False
                self._listen()
            except Exception:
                if self._stopping:
                    break
                self._failed = True
                self._pick += 1
                _warn_failure("hub lost Redis; retrying in %.1fs", backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                self._disconnect()

    def _connect(self) -> None:
        """A plain connection in subscribe mode, read and written by this thread only (lighter
        per message than redis-py's PubSub, and no other thread ever reconnects it). On a
        cluster, to any one node: a classic PUBLISH (the scripts', the doorbell's) reaches
        the subscribers of every node; after a failure, to the next node."""
        pool = subscriber_pool(
            self.redis_url, self.control, self._pick, self._failed, decode_responses=True,
            socket_connect_timeout=5, socket_keepalive=True,
        )  # fmt: skip
        self._conn = pool.get_connection()
        self._reader = PushReader(self._conn)
        send_command(self._conn, "SUBSCRIBE", self.doorbell)
        self._last_reply = time.monotonic()
        self._subscribed = set()
        self._confirming = []  # the old connection's: every stream is confirmed again
        with self._lock:
            for channel in self._channels.values():
                channel.confirmed = False
        self._reconcile()

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        self._reader = None
        if conn is not None:
            conn.disconnect()  # type: ignore[no-untyped-call]

    def _reconcile(self) -> None:
        """Subscribe the watched streams not yet subscribed, unsubscribe the others."""
        assert self._conn is not None
        with self._lock:
            self._rung = False
            watched = set(self._channels)
            for sid in watched & self._subscribed:
                self._channels[sid].confirmed = True  # subscribed all along
        added, dropped = watched - self._subscribed, self._subscribed - watched
        if added:
            send_command(self._conn, "SUBSCRIBE", *(keys.live_channel(sid) for sid in added))
        if dropped:
            send_command(self._conn, "UNSUBSCRIBE", *(keys.live_channel(sid) for sid in dropped))
        self._subscribed = watched
        if added or dropped:
            self._presence(added, dropped)

    def _listen(self) -> None:
        conn, reader = self._conn, self._reader
        assert conn is not None and reader is not None
        next_check = time.monotonic() + self.check_interval_s
        while not self._stopping:
            for reply in reader.read(max(0.0, min(1.0, next_check - time.monotonic()))):
                self._handle(reply)
            self._confirm()
            if time.monotonic() >= next_check:
                self._keep_alive(conn)
                self._reconcile()  # a safety net: rings are not durable either
                self.check()
                next_check = time.monotonic() + self.check_interval_s

    def _keep_alive(self, conn: Connection) -> None:
        """PING on every check; a connection silent for three checks is dead."""
        if time.monotonic() - self._last_reply > 3 * self.check_interval_s:
            raise redis.ConnectionError("the hub's pub/sub connection stopped answering")
        send_command(conn, "PING")

    def _handle(self, reply: Any) -> None:
        self._last_reply = time.monotonic()
        if not isinstance(reply, list) or len(reply) < 2 or reply[0] == "pong":
            return  # the answer to our PING (RESP3: "PONG"; RESP2: ["pong", ""])
        kind, channel = reply[0], reply[1]
        if channel == self.doorbell:
            # A ring, or the doorbell's own subscription taking effect (rings sent before it
            # went nowhere): either way, subscribe what is watched now.
            if kind in ("message", "subscribe"):
                self._reconcile()
            return
        stream_id = keys.stream_id_from_key(channel)
        if kind == "message":
            message = decode(reply[2])
            if isinstance(message, Notice):
                for sub in self._subs_of(stream_id):
                    sub.notice(message)
            else:
                self._dispatch(stream_id, message)
        elif kind == "subscribe":
            with self._lock:
                subscribed = self._channels.get(stream_id)
                if subscribed is None:
                    return
                subscribed.confirmed = True
            self._confirming.append(stream_id)  # checked once the replies read are handled

    def _confirm(self) -> None:
        """Redis listens for the streams confirmed in the replies just handled: what their
        viewers may have missed before is in the log. Those waiting with everything the log
        has now (and the queue place it keeps) have missed nothing, since whatever is written
        next comes through the hub; the others read the log once more. Checked in one read
        of the streams' states (one round trip for all, as after a reconnect, when every
        stream is confirmed again) rather than a log read by every viewer: a burst of
        thousands of viewers of queued answers, whose confirmations come while they wait,
        would otherwise all read the log again."""
        confirmed, self._confirming = self._confirming, []
        if not confirmed:
            return
        try:
            pipe = self.control.pipeline(transaction=False)
            for sid in confirmed:
                pipe.hmget(keys.state_key(sid), *PLACE_FIELDS)
            states: list[Any] = pipe.execute()
        except (redis.RedisError, RedisClusterException):
            _warn_failure("hub state read failed")
            states = [None] * len(confirmed)
        for sid, fields in zip(confirmed, states, strict=True):
            self._confirmed(sid, fields)

    def _confirmed(self, stream_id: str, fields: list[str | None] | None) -> None:
        """Flag the viewers of ``stream_id`` that its state ``fields`` (None: unknown) does
        not show to have everything."""
        seq = 0 if fields is None else int(fields[1] or 0)
        place = None if fields is None else place_in_state(fields)
        with self._lock:
            channel = self._channels.get(stream_id)
            if channel is None:
                return
            if fields is not None:
                channel.seen = max(channel.seen, seq)  # each viewer has it, or is flagged
            subs = list(channel.subs)
        for sub in subs:
            if fields is None or not sub.has(seq, None if place is None else place[1]):
                sub.flag()

    def _dispatch(self, stream_id: str, batch: Batch) -> None:
        self._dispatched += 1
        timed = not self._dispatched % 16  # a sample: the metric costs more than a dispatch
        started = time.perf_counter() if timed else 0.0
        with self._lock:
            channel = self._channels.get(stream_id)
            if channel is None:
                return
            channel.seen = max(channel.seen, batch.last)
            subs = list(channel.subs)
        if batch.types[-1] in TERMINAL_TYPES:  # the viewer decides when the stream ends
            for sub in subs:
                sub.offer(batch)
        else:
            after, last = batch.first - 1, batch.last
            for sub in subs:
                if not sub.direct_after(batch, after, last):
                    sub.offer(batch)
        if timed:
            HUB_DISPATCH.observe(time.perf_counter() - started)

    # -- the periodic check ---------------------------------------------------------------------

    def check(self) -> None:
        """Flag the viewers of every watched stream that has moved past what the hub saw, or
        whose writer is gone (finished, stale heartbeat, no state): they re-read the log,
        and from SQL if the log cannot finish them."""
        with self._lock:
            watched = [(sid, c.seen) for sid, c in self._channels.items() if c.confirmed]
        if not watched:
            return
        if isinstance(self.control, RedisCluster):  # TIME has no slot: a round trip of its own
            try:
                now_ms = server_time_ms(self.control)
                cluster_pipe = self.control.pipeline(transaction=False)  # type: ignore[no-untyped-call]
                for sid, _ in watched:
                    cluster_pipe.hmget(keys.state_key(sid), "status", "hb", "seq")
                states = cluster_pipe.execute()
            except (redis.RedisError, RedisClusterException):
                # Another node than the hub's may be down: the hub's own connection is
                # checked by its PING; this check runs again next interval.
                _warn_failure("hub check failed")
                return
        else:
            pipe = self.control.pipeline(transaction=False)
            pipe.time()
            for sid, _ in watched:
                pipe.hmget(keys.state_key(sid), "status", "hb", "seq")
            replies = pipe.execute()
            seconds, micros = replies[0]
            now_ms = int(seconds) * 1000 + int(micros) // 1000
            states = replies[1:]
        self._clock_offset_ms = now_ms - int(time.time() * 1000)
        for (sid, seen), state in zip(watched, states, strict=True):
            missed, writer_gone = self._look(state, seen, now_ms)
            if missed or writer_gone:
                self._flag_stream(sid, state[2], writer_gone)
        self._presence([sid for sid, _ in watched], ())

    def _presence(self, attached: Iterable[str], left: Iterable[str]) -> None:
        """Renew this process's lease on the streams it has viewers of; end it (at now) on
        the streams its last viewer left. Best effort: a lease not renewed runs out."""
        now_ms = int(time.time() * 1000) + self._clock_offset_ms
        writes = [(sid, now_ms + self.presence_lease_ms) for sid in attached]
        writes += [(sid, now_ms) for sid in left]
        if not writes:
            return
        try:
            pipe = self.control.pipeline(transaction=False)
            for sid, until_ms in writes:
                key = keys.viewers_key(sid)
                pipe.zadd(key, {self.hub_id: until_ms})
                pipe.pexpire(key, self.presence_ttl_ms)
            pipe.execute()
        except (redis.RedisError, RedisClusterException):
            _warn_failure("hub presence write failed")

    def _look(self, state: list[str | None], seen: int, now_ms: int) -> tuple[bool, bool]:
        """(the log is past what the hub saw, the writer is gone or done)."""
        status, heartbeat, seq = state
        missed = seq is not None and int(seq) > seen
        if status == "queued":
            return missed, False
        if status == "running":
            return missed, heartbeat is None or now_ms - int(heartbeat) >= self.stale_ms
        return missed, True  # finished with viewers still waiting, or the state is gone

    def _flag_stream(self, stream_id: str, seq: str | None, check: bool) -> None:
        with self._lock:
            channel = self._channels.get(stream_id)
            if channel is None:
                return
            if seq is not None:
                channel.seen = max(channel.seen, int(seq))
            subs = list(channel.subs)
        for sub in subs:
            sub.flag(check)

    def _subs_of(self, stream_id: str) -> list[Subscription]:
        with self._lock:
            channel = self._channels.get(stream_id)
            return [] if channel is None else list(channel.subs)

    def _all_subs(self) -> list[Subscription]:
        with self._lock:
            return [sub for c in self._channels.values() for sub in c.subs]


@dataclass
class _Link:
    """A sharded hub's subscribed connection to one primary."""

    name: str  # the node, host:port
    conn: Connection
    reader: PushReader
    last_reply: float


class ShardedHub(Hub):
    """The hub on a Redis Cluster of Redis 7 or later, with sharded pub/sub.

    The chunk log's scripts ``SPUBLISH`` a stream's events on the stream's own primary
    (``models.scripts.sharded``), so the message never crosses the cluster bus: no other node
    spends CPU on it and it reaches the hub without the bus's delay. The hub keeps a
    connection to every primary and ``SSUBSCRIBE``s each watched stream on the primary that
    owns its slot (one channel per command: a command's shard channels must share a slot).
    Every connection is also subscribed to the doorbell (a classic channel: the ring reaches
    every node).

    A primary that cannot be reached costs only its own streams: their viewers are flagged
    (re-read the log, check the writer), and the hub refreshes the slot map and connects
    again at the next repair, at once for a replica promoted in its place. A slot that moves
    away (failover, resharding) ends its subscriptions with a ``sunsubscribe`` from the
    server: the hub subscribes them again on the new owner, whose confirmation flags the
    viewers, so nothing published in between is missed."""

    def __init__(self, redis_url: str, control: RedisClient, **options: Any) -> None:
        super().__init__(redis_url, control, **options)
        if not isinstance(control, RedisCluster):
            raise TypeError("sharded pub/sub needs a Redis Cluster client")
        self.cluster = control
        self._links: dict[str, _Link] = {}
        self._selector = selectors.DefaultSelector()  # the links' sockets (gevent's, patched)
        # Subscribed stream -> its link (the hub thread's; the base class's _subscribed is
        # not used here).
        self._where: dict[str, str] = {}
        self._repair_at: float | None = 0.0  # when to connect what is missing (None: nothing)
        self._refresh = False  # refresh the slot map before that
        self._repair_delay = 0.1

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._listen()
            except Exception:
                if self._stopping:
                    break
                _warn_failure("sharded hub failed; starting over")
                self._disconnect()
                self._refresh, self._repair_at = True, time.monotonic() + 1.0
        self._disconnect()

    def _disconnect(self) -> None:
        for link in list(self._links.values()):
            self._drop(link)
        self._links, self._where = {}, {}

    def _listen(self) -> None:
        next_check = time.monotonic() + self.check_interval_s
        while not self._stopping:
            now = time.monotonic()
            if self._repair_at is not None and now >= self._repair_at:
                self._repair()
            if now >= next_check:
                for link in list(self._links.values()):
                    self._ping(link)
                self._verify()
                self._reconcile()  # a safety net: rings are not durable either
                self.check()
                next_check = time.monotonic() + self.check_interval_s
            until = next_check if self._repair_at is None else min(next_check, self._repair_at)
            self._wait(max(0.0, min(1.0, until - time.monotonic())))

    def _wait(self, timeout: float) -> None:
        """Read what arrives on any link within ``timeout`` seconds."""
        if not self._links:
            time.sleep(timeout)
            return
        for key, _ in self._selector.select(timeout):
            link: _Link = key.data
            if self._links.get(link.name) is not link:
                continue  # lost while handling another link's replies
            try:
                replies = link.reader.read(0.0)
            except (OSError, redis.RedisError) as exc:
                self._lose(link, f"{type(exc).__name__}: {exc}")
                continue
            for reply in replies:
                if self._links.get(link.name) is not link:
                    break  # lost while handling an earlier reply
                self._handle_on(link, reply)
            self._confirm()

    # -- links ----------------------------------------------------------------------------------

    def _repair(self) -> None:
        """Connect a link to every primary of the (refreshed) slot map that has none; drop
        links to nodes that are no longer primaries; subscribe what is watched."""
        self._repair_at = None
        if self._refresh:
            try:
                self.cluster.nodes_manager.initialize()
                self._refresh = False
            except (redis.RedisError, RedisClusterException) as exc:
                self._retry_repair(f"the slot map: {exc}")
                return
        primaries = {node.name: node for node in self.cluster.get_primaries()}  # type: ignore[no-untyped-call]
        for name, link in list(self._links.items()):
            if name not in primaries:
                self._lose(link, "no longer a primary")
        for name, node in primaries.items():
            if name not in self._links:
                try:
                    self._links[name] = self._link(name, node.host, node.port)
                except (OSError, redis.RedisError) as exc:
                    self._retry_repair(f"{name}: {exc}")
        if self._repair_at is None:
            self._repair_delay = 0.1
        self._reconcile()

    def _retry_repair(self, why: str) -> None:
        if self._repair_delay == 0.1:
            log.warning("hub: cannot reach a primary (%s); trying again", why)
        self._refresh, self._repair_at = True, time.monotonic() + self._repair_delay
        self._repair_delay = min(self._repair_delay * 2, 5.0)

    def _repair_soon(self, at_once: bool = False) -> None:
        """Read the slot map again and repair: ``at_once``, else after the current delay
        (unless a repair is due already)."""
        self._refresh = True
        if at_once:
            self._repair_at = time.monotonic()
        elif self._repair_at is None:
            self._repair_at = time.monotonic() + self._repair_delay

    def _link(self, name: str, host: str, port: int) -> _Link:
        pool = node_pool(
            self.redis_url, host, port, decode_responses=True, socket_connect_timeout=5,
            socket_keepalive=True,
        )  # fmt: skip
        conn = pool.get_connection()
        reader = PushReader(conn)
        send_command(conn, "SUBSCRIBE", self.doorbell)
        link = _Link(name, conn, reader, time.monotonic())
        self._selector.register(reader.sock, selectors.EVENT_READ, link)
        return link

    def _drop(self, link: _Link) -> None:
        if self._links.get(link.name) is link:
            del self._links[link.name]
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(link.reader.sock)
        link.conn.disconnect()  # type: ignore[no-untyped-call]

    def _lose(self, link: _Link, why: str) -> None:
        """A link failed: its streams are no longer subscribed; their viewers re-read the
        log (and check the writer) while the hub connects again."""
        if not self._stopping:
            log.warning("hub lost %s (%s); its streams re-read the log", link.name, why)
        self._drop(link)
        lost = [sid for sid, name in self._where.items() if name == link.name]
        self._unsubscribed(lost)
        self._repair_soon()

    def _unsubscribed(self, stream_ids: list[str]) -> None:
        """``stream_ids`` lost their subscription: flag their viewers."""
        for sid in stream_ids:
            self._where.pop(sid, None)
            with self._lock:
                channel = self._channels.get(sid)
                if channel is not None:
                    channel.confirmed = False
            self._flag_stream(sid, None, True)

    def _ping(self, link: _Link) -> None:
        """PING on every check; a link silent for three checks is dead."""
        if time.monotonic() - link.last_reply > 3 * self.check_interval_s:
            self._lose(link, "stopped answering")
            return
        try:
            send_command(link.conn, "PING")
        except (OSError, redis.RedisError) as exc:
            self._lose(link, f"{type(exc).__name__}: {exc}")

    # -- subscriptions --------------------------------------------------------------------------

    def _reconcile(self) -> None:
        """SSUBSCRIBE the watched streams not yet subscribed, each on its primary's link;
        SUNSUBSCRIBE the others."""
        with self._lock:
            self._rung = False
            watched = set(self._channels)
        # (A stream counts as confirmed only once its primary says "ssubscribe": unlike a
        # classic SUBSCRIBE, an SSUBSCRIBE can be refused, with MOVED.)
        commands: dict[str, list[tuple[str, str]]] = {}
        dropped = self._where.keys() - watched
        for sid in dropped:
            was = self._where.pop(sid)
            if was in self._links:
                commands.setdefault(was, []).append(("SUNSUBSCRIBE", keys.live_channel(sid)))
        added = []
        for sid in watched - self._where.keys():
            channel = keys.live_channel(sid)
            name = self._owner(channel)
            if name is None or name not in self._links:  # no primary to reach now: at the repair
                self._repair_soon()
                continue
            commands.setdefault(name, []).append(("SSUBSCRIBE", channel))
            self._where[sid] = name
            added.append(sid)
        for name, batch in commands.items():
            link = self._links[name]
            try:
                link.conn.send_packed_command(link.conn.pack_commands(batch))  # type: ignore[no-untyped-call]
            except (OSError, redis.RedisError) as exc:
                self._lose(link, f"{type(exc).__name__}: {exc}")
        if added or dropped:
            self._presence(added, dropped)

    def _verify(self) -> None:
        """Subscribe again, on its owner, every stream whose slot the (refreshed) map puts
        on another primary than its subscription's: a safety net for a move not heard of."""
        for sid, name in list(self._where.items()):
            owner = self._owner(keys.live_channel(sid))
            if owner is not None and owner != name:
                link = self._links.get(name)
                if link is not None:
                    with contextlib.suppress(OSError, redis.RedisError):
                        send_command(link.conn, "SUNSUBSCRIBE", keys.live_channel(sid))
                self._unsubscribed([sid])

    def _owner(self, channel: str) -> str | None:
        """The primary that owns ``channel``'s slot in the client's map (None: no node
        covers it now, as while a replica is being promoted)."""
        try:
            return str(self.cluster.get_node_from_key(channel).name)  # type: ignore[no-untyped-call]
        except RedisClusterException:
            return None

    def _handle_on(self, link: _Link, reply: Any) -> None:
        link.last_reply = time.monotonic()
        if isinstance(reply, Exception):
            # An SSUBSCRIBE refused (MOVED: the slot map was stale): the link's streams not
            # yet confirmed are subscribed again once the map is read again.
            log.info("hub: %s answered %s", link.name, reply)
            with self._lock:
                pending = [
                    sid
                    for sid, name in self._where.items()
                    if name == link.name
                    and (c := self._channels.get(sid)) is not None
                    and not c.confirmed
                ]
            self._unsubscribed(pending)
            self._repair_soon()
            return
        if isinstance(reply, list) and len(reply) >= 2:
            kind = reply[0]
            if kind == "sunsubscribe":
                sid = keys.stream_id_from_key(reply[1])
                if self._where.get(sid) == link.name:  # not ours: the slot moved away
                    self._unsubscribed([sid])
                    self._repair_soon(at_once=True)
                return
            if kind in ("smessage", "ssubscribe"):
                reply = [kind[1:], *reply[1:]]
        self._handle(reply)


def make_hub(
    redis_url: str, control: RedisClient, *, sharded: bool | None = None, **options: Any
) -> Hub:
    """The hub for relay's data Redis: ``sharded`` (by default: on a cluster of Redis 7 or
    later, ``sharded_pubsub``) or classic. It must match the scripts' (``ChunkLog.sharded``)."""
    if sharded_pubsub(control) if sharded is None else sharded:
        return ShardedHub(redis_url, control, **options)
    return Hub(redis_url, control, **options)


# Redis unreachable or restarting (the web tier's backend-unavailable errors, and a socket
# error from the hub's own reads): expected in an outage, and the hub retries by itself.
_OUTAGES = (*UNAVAILABLE_ERRORS, OSError)


def _warn_failure(message: str, *args: object) -> None:
    """Warn about the exception being handled: one line when Redis is unreachable (an outage,
    retried), the traceback for anything else."""
    exc = sys.exc_info()[1]
    if isinstance(exc, _OUTAGES):
        log.warning(message + " (%s: %s)", *args, type(exc).__name__, exc)
    else:
        log.warning(message, *args, exc_info=True)


class PushReader:
    """Reads a subscribed connection's socket straight into a hiredis reader: one recv per
    wake-up and every whole reply it completed. (redis-py's ``can_read`` polls the socket
    twice and peeks it, and its parser formats a debug line for every message: those were
    two fifths of a web process's CPU at 4,000 messages a second.) Commands are still sent
    through the redis-py connection, which made the connection (AUTH, SELECT, TLS)."""

    def __init__(self, conn: Connection) -> None:
        sock: socket.socket | None = conn._sock
        if sock is None:
            raise redis.ConnectionError("the hub's connection is not connected")
        self.sock = sock
        encoding = conn.encoder.encoding if conn.encoder.decode_responses else None
        self.reader: hiredis.Reader = hiredis.Reader(
            encoding=encoding, errors=conn.encoder.encoding_errors
        )
        self.buffer = bytearray(65536)
        self.timeout: float | None = None

    def read(self, timeout: float) -> list[Any]:
        """The replies that arrive within ``timeout`` seconds (none when nothing came)."""
        if timeout != self.timeout:
            self.sock.settimeout(timeout)
            self.timeout = timeout
        try:
            n = self.sock.recv_into(self.buffer)
        except TimeoutError:
            return []
        except BlockingIOError:  # timeout 0 and nothing there
            return []
        if n == 0:
            raise redis.ConnectionError("Redis closed the hub's connection")
        self.reader.feed(self.buffer, 0, n)  # type: ignore[arg-type]  # any buffer, as redis-py feeds it
        replies = []
        while (reply := self.reader.gets()) is not False:
            replies.append(reply)
        return replies


def send_command(conn: Connection, *args: str) -> None:
    conn.send_command(*args)  # type: ignore[no-untyped-call]


def decode(data: str) -> Batch | Notice:
    """A live-channel message: ``[first seq, [types], [data]]``, a batch of events; or
    ``{"seq": ..., "notice": {...}}``, a queue notice (QUEUE_NOTICE)."""
    message = json.loads(data)
    if isinstance(message, dict):
        return Notice(int(message["seq"]), json.dumps(message["notice"], separators=(",", ":")))
    first, types, datas = message
    return Batch(int(first), types, datas)
