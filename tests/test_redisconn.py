"""``models.redisconn``: its process-wide change to redis-py (no server needed) and the
pinned connection's writes (a real Redis)."""

from __future__ import annotations

from importlib import metadata

import pytest
import redis
import redis.utils
from redis.exceptions import DataError

import models.redisconn  # noqa: F401  (importing it is what resolves the version once)
from models.redisconn import PinnedConnection, pack_commands
from ops.redis_server import EmbeddedRedis


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


COMMANDS: list[list[object]] = [
    [
        "EVALSHA",
        "a" * 40,
        2,
        "relay:{s}:state",
        "relay:{s}:log",
        86400,
        3600,
        2,
        "x",
        1,
        7,
        1,
        "chunk",
        "héllo\n",
    ],
    ["HMGET", "relay:{s}:state", "attempt", "seq"],
    ["SET", b"k\x00\xff", 1.5, "EX", -3, 0.1, 10**20],
    ["WAIT", 1, 1000],
]


def test_commands_are_packed_as_redis_py_packs_them() -> None:
    """The appender's round trips are packed by hiredis directly, byte for byte as redis-py's
    own packer writes them; what hiredis does not take goes to redis-py's, which refuses it
    (a bool, None) or splits a command name of several words, as it always has."""
    conn = redis.Connection(host="127.0.0.1", port=1)  # never dialled
    expected = b"".join(conn.pack_commands(COMMANDS))
    assert pack_commands(conn, COMMANDS) == expected
    assert pack_commands(conn, [["CLIENT SETNAME", "x"]]) == b"".join(
        conn.pack_commands([["CLIENT", "SETNAME", "x"]])
    )
    for bad in (None, True):
        with pytest.raises(DataError):
            pack_commands(conn, [["SET", "k", bad]])


def test_a_pinned_connection_writes_a_round_trip_larger_than_the_sockets_buffer(
    redis_server: EmbeddedRedis,
) -> None:
    """One send() takes part of a large write (a socket with a timeout, as relay's are); the
    rest goes through redis-py's write, and every reply comes back in order."""
    client = redis.Redis(port=redis_server.port, db=2, socket_timeout=10, decode_responses=True)
    pinned = PinnedConnection(client)
    rests: list[int] = []
    write = pinned.conn.send_packed_command

    def counted(command: list[bytes], check_health: bool = True) -> None:
        rests.append(sum(len(part) for part in command))
        write(command, check_health=check_health)

    assert pinned.pipeline([["PING"]]) == ["PONG"]  # connected: what follows is the write
    pinned.conn.send_packed_command = counted
    big = "x" * (16 << 20)  # far beyond a loopback socket's send buffer
    key = "relay:test:pinned-big"
    try:
        replies = pinned.pipeline([["SET", key, big], ["STRLEN", key], ["GET", "relay:test:none"]])
        assert replies == ["OK", 16 << 20, None]
        assert len(rests) == 1 and 0 < rests[0] < len(big)  # a part went first, then the rest
        assert pinned.pipeline([["DEL", key]]) == [1]
    finally:
        client.delete(key)
        client.close()
