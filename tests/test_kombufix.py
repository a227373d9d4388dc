"""kombu's Redis channel that outlives its kombu connection (ops/kombufix.py), on a real Redis:
closing it restores its unacknowledged messages instead of raising AttributeError."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue

from ops.kombufix import repair_late_restore
from ops.redis_server import EmbeddedRedis

EXCHANGE = Exchange("kombufix", type="direct")
QUEUE = Queue("kombufix", EXCHANGE, routing_key="kombufix")
UNACKED = "unacked"  # kombu's ack-emulation hash (the Redis transport's default name)


@contextmanager
def delivered(server: EmbeddedRedis) -> Iterator[tuple[Connection, Any]]:
    """A connection and a channel holding one delivered, unacknowledged message."""
    repair_late_restore()
    with Connection(server.url) as conn:
        conn.Producer().publish(
            {"n": 1}, exchange=EXCHANGE, routing_key="kombufix", declare=[QUEUE]
        )
        channel = conn.channel()
        message = channel.basic_get(QUEUE.name)  # ack emulation: now in the unacked hash
        assert message is not None and message.payload == {"n": 1}
        # What Connection.collect() leaves when it could not close this channel (a BRPOP reply
        # pending on a dead socket): the transport cut off from its kombu Connection.
        channel.connection.client = None
        yield conn, channel


def probe(server: EmbeddedRedis) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, decode_responses=True)


def test_closing_a_channel_cut_off_from_its_connection_restores_its_message(
    tmp_path: Path,
) -> None:
    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        with delivered(server) as (_, channel):
            channel.close()  # kombu 5.7.0 alone: AttributeError (... no attribute 'hostname')
        r = probe(server)
        assert r.llen(QUEUE.name) == 1  # back on its queue, for any worker to take
        assert r.hlen(UNACKED) == 0
    finally:
        server.stop()


def test_with_redis_down_the_restore_fails_as_a_connection_error_and_keeps_the_message(
    tmp_path: Path,
) -> None:
    """Nothing is swallowed: Redis's own error comes out (Celery ignores connection errors
    while it reconnects), and the message stays in the unacked hash, for the running task's
    ack or the visibility timeout."""
    server = EmbeddedRedis(tmp_path / "redis", persistent=True).start()
    try:
        with delivered(server) as (conn, channel):
            server.stop()
            with pytest.raises(conn.connection_errors):
                channel.close()
        server.start()
        r = probe(server)
        assert r.hlen(UNACKED) == 1
        assert r.llen(QUEUE.name) == 0
    finally:
        server.stop()


def test_a_channel_with_nothing_to_reuse_still_raises_kombus_error(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        repair_late_restore()
        with Connection(server.url) as conn:
            channel = conn.channel()  # it has built its asynchronous pool only
            channel.connection.client = None
            with pytest.raises(AttributeError, match="hostname"):
                channel._connparams(asynchronous=False)
    finally:
        server.stop()


def test_the_repair_applies_once() -> None:
    repair_late_restore()
    assert repair_late_restore() is False
