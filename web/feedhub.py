"""One feed subscriber per web process: one pub/sub connection brings every user's feed events.

The feed's script publishes each event on its user's channel as it adds it. The subscriber
holds one pattern subscription (``keys.FEED_CHANNEL_PATTERN``) for all of them, so it never
subscribes or unsubscribes as pages come and go, and hands each event to the watches of its
user in this process: a watch is a small mailbox that wakes its page's connection. Feed
events are few (a handful per answer), so every process receiving every user's events costs
little; the hub (web/hub.py) subscribes per stream because chunks are many.

Pub/sub is not durable, the feed is. Whenever the subscriber may have missed a message (its
subscription just took effect, after a start or a reconnect) every watch is flagged and its
connection re-reads the feed; a watch that falls too far behind is flagged instead of fed.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from typing import Any

import redis
from redis.connection import Connection
from redis.exceptions import RedisClusterException

from models import keys
from models.redisconn import RedisClient, subscriber_pool
from web.hub import PushReader, send_command

log = logging.getLogger("relay.feed")


class FeedWatch:
    """One connection's mailbox for its user's feed."""

    def __init__(self, user_id: str, wake: threading.Event, limit: int) -> None:
        self.user_id = user_id
        self.wake = wake
        self.limit = limit
        self._events: list[tuple[int, str]] = []
        self._reread = False
        self._lock = threading.Lock()

    def offer(self, seq: int, data: str) -> None:
        with self._lock:
            if len(self._events) >= self.limit:
                self._reread = True  # dropped: the connection reads the feed instead
            else:
                self._events.append((seq, data))
        self.wake.set()

    def flag(self) -> None:
        """Something may have been missed: the connection re-reads the feed."""
        with self._lock:
            self._reread = True
        self.wake.set()

    def take(self) -> tuple[list[tuple[int, str]], bool]:
        """The events offered since the last call, and whether to re-read the feed."""
        with self._lock:
            out = self._events, self._reread
            self._events, self._reread = [], False
        return out


class FeedHub:
    """Follow every user's feed channel over one pub/sub connection, owned by one thread."""

    def __init__(
        self, redis_url: str, control: RedisClient, *, ping_s: float = 5.0, limit: int = 256
    ) -> None:
        self.redis_url = redis_url
        self.control = control
        self.ping_s = ping_s
        self.limit = limit
        self._watches: dict[str, set[FeedWatch]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._pick = random.randrange(1 << 16)  # on a cluster: the node to listen on
        self._failed = False
        # The highest seq handed (or known to exist) per watched user; the subscriber
        # thread's own.
        self._seen: dict[str, int] = {}

    def watch(self, user_id: str, wake: threading.Event) -> FeedWatch:
        """Offer ``user_id``'s feed events to a new watch from now on; the caller reads the
        feed once after this call (events published before are not offered)."""
        watch = FeedWatch(user_id, wake, self.limit)
        with self._lock:
            self._watches.setdefault(user_id, set()).add(watch)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="relay-feed", daemon=True)
                self._thread.start()
        return watch

    def unwatch(self, watch: FeedWatch) -> None:
        with self._lock:
            watches = self._watches.get(watch.user_id)
            if watches is not None:
                watches.discard(watch)
                if not watches:
                    del self._watches[watch.user_id]

    def wake_all(self) -> None:
        """Wake every connection (the process is shutting down)."""
        for watch in self._all():
            watch.wake.set()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"users": len(self._watches), "watches": sum(map(len, self._watches.values()))}

    def stop(self) -> None:
        self._stopping = True

    def _all(self) -> list[FeedWatch]:
        with self._lock:
            return [w for ws in self._watches.values() for w in ws]

    # -- the subscriber thread ----------------------------------------------------------------

    def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            conn: Connection | None = None
            try:
                conn = self._connect()
                backoff = 0.1
                self._failed = False
                self._listen(conn)
            except Exception:
                if self._stopping:
                    break
                self._failed = True
                self._pick += 1
                log.warning("feed subscriber lost Redis; retrying in %.1fs", backoff,
                            exc_info=True)  # fmt: skip
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if conn is not None:
                    conn.disconnect()  # type: ignore[no-untyped-call]

    def _connect(self) -> Connection:
        """A plain connection in subscribe mode, as the hub's (on a cluster, to any node: a
        classic PUBLISH reaches the subscribers of every node)."""
        pool = subscriber_pool(
            self.redis_url, self.control, self._pick, self._failed, decode_responses=True,
            socket_connect_timeout=5, socket_keepalive=True,
        )  # fmt: skip
        conn: Connection = pool.get_connection()
        send_command(conn, "PSUBSCRIBE", keys.FEED_CHANNEL_PATTERN)
        return conn

    def _listen(self, conn: Connection) -> None:
        reader = PushReader(conn)
        last_reply = time.monotonic()
        next_ping = last_reply + self.ping_s
        while not self._stopping:
            for reply in reader.read(max(0.0, min(1.0, next_ping - time.monotonic()))):
                self._handle(reply)
                last_reply = time.monotonic()
            if time.monotonic() >= next_ping:
                if time.monotonic() - last_reply > 3 * self.ping_s:
                    raise redis.ConnectionError("the feed subscriber's connection went silent")
                send_command(conn, "PING")
                self.check()
                next_ping = time.monotonic() + self.ping_s

    def _handle(self, reply: Any) -> None:
        if not isinstance(reply, list) or not reply:
            return
        if reply[0] == "psubscribe":  # listening (again): anything before may be missed
            for watch in self._all():
                watch.flag()
        elif reply[0] == "pmessage" and len(reply) == 4:
            self._dispatch(keys.user_id_from_feed_channel(reply[2]), reply[3])

    def _dispatch(self, user_id: str, data: str) -> None:
        with self._lock:
            watches = list(self._watches.get(user_id, ()))
        if watches:
            seq = int(json.loads(data)["seq"])
            self._seen[user_id] = max(self._seen.get(user_id, 0), seq)
            for watch in watches:
                watch.offer(seq, data)

    def check(self) -> None:
        """The safety net (every ``ping_s``): flag the watches of every user whose feed has
        moved past what this process was handed (a message lost on the way; on a cluster,
        PUBLISH crosses the cluster bus). One pipelined read per watched user and check."""
        with self._lock:
            users = list(self._watches)
        self._seen = {u: self._seen.get(u, 0) for u in users}  # forget users gone
        if not users:
            return
        try:
            pipe = self.control.pipeline(transaction=False)
            for user_id in users:
                pipe.xrevrange(keys.feed_key(user_id), "+", "-", count=1)
            replies = pipe.execute()
        except (redis.RedisError, RedisClusterException):
            log.warning("feed check failed", exc_info=True)  # again at the next check
            return
        for user_id, entries in zip(users, replies, strict=True):
            last = int(entries[0][0].rsplit("-", 1)[1]) if entries else 0
            if last > self._seen[user_id]:
                self._seen[user_id] = last
                with self._lock:
                    watches = list(self._watches.get(user_id, ()))
                for watch in watches:
                    watch.flag()
