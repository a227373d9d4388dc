"""``models.redisconn``'s process-wide change to redis-py, in-process (no server needed)."""

from __future__ import annotations

from importlib import metadata

import pytest
import redis
import redis.utils

import models.redisconn  # noqa: F401  (importing it is what resolves the version once)


def test_new_connections_read_redis_pys_version_from_the_package_metadata_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """redis-py 8 reads its version from the package metadata for each connection it builds
    (about 240 µs); relay's processes read it once, for their pools and kombu's alike."""
    version = metadata.version("redis")
    redis.utils.get_lib_version()  # whatever this process had resolved before
    reads: list[str] = []

    def counted(name: str) -> str:
        reads.append(name)
        return version

    monkeypatch.setattr(metadata, "version", counted)
    pool = redis.ConnectionPool(host="127.0.0.1", port=1)  # never dialled
    connections = [pool.make_connection() for _ in range(20)]
    connections.append(redis.Connection(host="127.0.0.1", port=1))
    assert reads == []
    assert {c.driver_info.lib_version for c in connections} == {version}
