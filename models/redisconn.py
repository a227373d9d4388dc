"""Redis clients: a blocking pool (never raises past its size) shared per process."""

from __future__ import annotations

import functools
from typing import Any

import redis


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
