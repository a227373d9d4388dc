"""Redis clients: a blocking pool (never raises past its size) shared per process."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry


def make_redis(url: str, max_connections: int = 200) -> redis.Redis:
    """A client whose pool waits for a free connection instead of raising."""
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=20,
        decode_responses=True,
        health_check_interval=30,
        socket_connect_timeout=5,
        **_driver_info(),
    )
    return redis.Redis(connection_pool=pool)


@functools.cache
def _driver_info() -> dict[str, Any]:
    """redis-py 8 reads its own version from the package metadata (disk, email parsing)
    for every new connection: a burst of a thousand viewers paid for it hundreds of
    times. Resolve it once."""
    try:
        from redis.driver_info import DriverInfo
        from redis.utils import get_lib_version
    except ImportError:  # redis-py before 8: nothing to resolve
        return {}
    version = get_lib_version()  # type: ignore[no-untyped-call]
    return {"driver_info": DriverInfo(name="redis-py", lib_version=version)}


def make_blocking_client(url: str, block_s: float) -> redis.Redis:
    """A single-connection client for long ``XREAD BLOCK`` calls (socket timeout above BLOCK)."""
    return redis.Redis.from_url(
        url,
        decode_responses=True,
        single_connection_client=True,
        socket_timeout=block_s + 10,
        socket_connect_timeout=5,
    )


class PinnedConnection:
    """One connection of a client's kind, held by one owner that sends a pipeline many times
    a second (the worker's appender): no pool checkout, pid check or lock per round trip
    (those were a tenth of a busy worker's CPU). Not thread-safe: one owner.

    Like the pool at checkout, it makes sure a connection that sat idle (``recheck_idle_s``)
    was not closed meanwhile (a Redis restart, a server timeout) before sending on it, and
    dials again if it was; a busy connection is not polled before every round trip."""

    def __init__(self, client: redis.Redis, recheck_idle_s: float = 1.0) -> None:
        pool = client.connection_pool
        # No retries inside (not even while connecting): whether a failed round trip may be
        # sent again is its owner's call (an append may have run), and so is how long to try.
        kwargs = {**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
        self.conn = pool.connection_class(**kwargs)
        self.recheck_idle_s = recheck_idle_s
        self.used_at = 0.0

    def pipeline(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send ``commands`` in one write; return a reply per command (a ResponseError in
        place of a command that failed). Raises the connection's errors at once."""
        conn = self.conn
        now = time.monotonic()
        if now - self.used_at >= self.recheck_idle_s:
            self._drop_if_closed()
        self.used_at = now
        try:
            return self._round_trip(commands)
        except Exception:
            conn.disconnect()  # never send on a connection left mid-reply
            raise

    def _drop_if_closed(self) -> None:
        conn = self.conn
        if conn._sock is None:  # not connected yet: sending dials
            return
        try:
            closed = conn.can_read()  # an idle connection has nothing to read unless closed
        except (RedisConnectionError, RedisTimeoutError, OSError):
            closed = True
        if closed:
            conn.disconnect()

    def _round_trip(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        conn = self.conn
        conn.send_packed_command(conn.pack_commands(commands))
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(conn.read_response())
            except ResponseError as exc:
                replies.append(exc)
        return replies
