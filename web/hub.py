"""One hub per web process: a single loop tails every watched stream with ``XREAD``.

Viewers cost memory, not Redis connections. The hub hands each new entry to every
subscription of its stream through a bounded queue; a subscription that falls behind is
marked ``lagged`` and its viewer re-reads the log at its own pace, so a slow viewer is never
buffered without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import cast

import redis

from models import keys
from models.events import Event
from models.redisconn import make_blocking_client
from web.instruments import HUB_DISPATCH, HUB_LAGGED

log = logging.getLogger("relay.hub")


class Subscription:
    """A viewer's mailbox for one stream."""

    def __init__(self, stream_id: str, maxsize: int) -> None:
        self.stream_id = stream_id
        self.queue: queue.Queue[Event] = queue.Queue(maxsize)
        self.lagged = False

    def offer(self, event: Event) -> None:
        try:
            self.queue.put_nowait(event)
        except queue.Full:
            self.lagged = True

    def get(self, timeout: float) -> Event | None:
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None


class Hub:
    """Tail all streams that have viewers in this process with one blocking connection."""

    def __init__(
        self,
        redis_url: str,
        control: redis.Redis,
        *,
        block_s: float = 5.0,
        count: int = 512,
        queue_size: int = 2048,
    ) -> None:
        self.redis_url = redis_url
        self.control = control  # pool client for CLIENT UNBLOCK
        self.block_s = block_s
        self.count = count
        self.queue_size = queue_size
        self._subs: dict[str, set[Subscription]] = {}
        self._cursors: dict[str, int] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._client_id: int | None = None
        self._version = 0  # bumped when a stream is added
        self._reading_version = -1  # version of the key set the current XREAD carries
        self._stopping = False

    # -- viewers -------------------------------------------------------------------------------

    def subscribe(self, stream_id: str, cursor: int) -> Subscription:
        """Watch ``stream_id`` from ``cursor`` (the last seq the viewer has)."""
        sub = Subscription(stream_id, self.queue_size)
        with self._lock:
            subs = self._subs.setdefault(stream_id, set())
            subs.add(sub)
            added = stream_id not in self._cursors
            if added:
                self._cursors[stream_id] = cursor
                self._version += 1
            version = self._version
            self._ensure_thread()
        if added:
            self._interrupt(version)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            subs = self._subs.get(sub.stream_id)
            if subs is None:
                return
            subs.discard(sub)
            if not subs:
                del self._subs[sub.stream_id]
                self._cursors.pop(sub.stream_id, None)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "streams": len(self._subs),
                "subscriptions": sum(len(s) for s in self._subs.values()),
            }

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._interrupt(self._version, tries=1)

    # -- the loop ------------------------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="relay-hub", daemon=True)
            self._thread.start()

    def _interrupt(self, version: int, tries: int = 40) -> None:
        """Wake a blocked XREAD so it picks up a new stream, retrying if not yet blocked."""
        self._wake.set()
        for _ in range(tries):
            if self._reading_version >= version or self._client_id is None:
                return
            try:
                if self.control.client_unblock(self._client_id):
                    return
            except redis.RedisError:
                return
            time.sleep(0.005)

    def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            conn = None
            try:
                conn = make_blocking_client(self.redis_url, self.block_s)
                self._client_id = int(conn.client_id())
                self._loop(conn)
                backoff = 0.1
            except redis.RedisError:
                log.warning("hub lost Redis; retrying in %.1fs", backoff, exc_info=True)
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                self._client_id = None
                if conn is not None:
                    conn.close()

    def _loop(self, conn: redis.Redis) -> None:
        while not self._stopping:
            with self._lock:
                streams = {keys.log_key(sid): f"0-{seq}" for sid, seq in self._cursors.items()}
                self._reading_version = self._version
            if not streams:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            self._wake.clear()
            result = cast(
                list[tuple[str, list[tuple[str, dict[str, str]]]]] | None,
                conn.xread(streams, count=self.count, block=int(self.block_s * 1000)),  # type: ignore[arg-type]
            )
            for key, entries in result or []:
                self._dispatch(keys.stream_id_from_key(key), entries)

    def _dispatch(self, stream_id: str, entries: list[tuple[str, dict[str, str]]]) -> None:
        started = time.perf_counter()
        events = [Event.from_entry(eid, fields) for eid, fields in entries]
        if not events:
            return
        with self._lock:
            if stream_id in self._cursors:
                self._cursors[stream_id] = max(self._cursors[stream_id], events[-1].seq)
            subs = list(self._subs.get(stream_id, ()))
        for sub in subs:
            was_lagged = sub.lagged
            for event in events:
                sub.offer(event)
            if sub.lagged and not was_lagged:
                HUB_LAGGED.inc()
        HUB_DISPATCH.observe(time.perf_counter() - started)
