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

from ops.kombufix import repair_late_restore, reuse_clients
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


def test_a_channel_reuses_one_client_for_its_commands_until_its_pool_changes(
    tmp_path: Path,
) -> None:
    """Publishes, unacked records and acks go through one redis-py client per channel (kombu
    5.7.0 alone builds one per command); a channel whose pools were dropped builds a new one
    on its new pool, and every message still arrives once."""
    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        reuse_clients()
        with Connection(server.url) as conn:
            channel = conn.channel()
            built: list[Any] = []
            create = channel._create_client

            def counting(asynchronous: bool = False) -> Any:
                client = create(asynchronous=asynchronous)
                built.append(client)
                return client

            channel._create_client = counting
            producer = conn.Producer(channel)
            for n in range(20):
                producer.publish({"n": n}, exchange=EXCHANGE, routing_key="kombufix",
                                 declare=[QUEUE])  # fmt: skip
            got = []
            for _ in range(20):
                message = channel.basic_get(QUEUE.name)  # records it in the unacked hash
                assert message is not None
                got.append(message.payload["n"])
                message.ack()
            assert sorted(got) == list(range(20))
            assert len(built) == 1
            assert probe(server).hlen(UNACKED) == 0

            channel._disconnect_pools()  # what kombu does when the channel closes
            producer.publish({"n": 20}, exchange=EXCHANGE, routing_key="kombufix")
            assert len(built) == 2 and built[1].connection_pool is not built[0].connection_pool
            assert probe(server).llen(QUEUE.name) == 1
    finally:
        server.stop()


def test_client_reuse_applies_once() -> None:
    reuse_clients()
    assert reuse_clients() is False
