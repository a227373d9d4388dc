"""The per-process hub against a real Redis: one loop, many streams, bounded queues."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from models.chunklog import ChunkLog
from models.events import CHUNK, Event
from ops.redis_server import EmbeddedRedis
from web.hub import Hub


@pytest.fixture
def hub(redis_server: EmbeddedRedis, redis_client: redis.Redis) -> Iterator[Hub]:
    url = f"redis://127.0.0.1:{redis_server.port}/2"
    # A block far longer than any wait below: entries can only arrive in time if the hub
    # is woken (CLIENT UNBLOCK) when a stream is added.
    h = Hub(url, redis_client, block_s=120.0, queue_size=4)
    yield h
    h.stop()


@pytest.fixture
def log(redis_client: redis.Redis) -> ChunkLog:
    return ChunkLog(redis_client)


def start(log: ChunkLog, sid: str) -> None:
    log.init(sid)
    log.claim(sid, "t", 5)


def test_delivers_new_entries_to_every_subscriber(hub: Hub, log: ChunkLog) -> None:
    start(log, "a")
    subs = [hub.subscribe("a", 0) for _ in range(3)]
    log.append("a", 1, Event(1, CHUNK, text="one"))
    for sub in subs:
        assert sub.get(30.0) == Event(1, CHUNK, text="one")
    assert hub.stats() == {"streams": 1, "subscriptions": 3}
    for sub in subs:
        hub.unsubscribe(sub)
    assert hub.stats() == {"streams": 0, "subscriptions": 0}


def test_a_new_stream_wakes_the_blocked_loop(hub: Hub, log: ChunkLog) -> None:
    start(log, "b")
    start(log, "c")
    first = hub.subscribe("b", 0)
    log.append("b", 1, Event(1, CHUNK, text="b1"))
    assert first.get(30.0) is not None  # the loop now blocks on b alone
    second = hub.subscribe("c", 0)
    log.append("c", 1, Event(1, CHUNK, text="c1"))
    # Without a wake-up the loop would sit in its 120 s XREAD on b and never see c here.
    assert second.get(30.0) == Event(1, CHUNK, text="c1")


def test_a_slow_subscriber_is_marked_lagged_not_buffered(hub: Hub, log: ChunkLog) -> None:
    start(log, "d")
    slow = hub.subscribe("d", 0)
    fast = hub.subscribe("d", 0)
    for seq in range(1, 11):
        log.append("d", 1, Event(seq, CHUNK, text=str(seq)))
        assert fast.get(30.0) is not None
    assert slow.queue.qsize() == 4  # the bound, not 10
    assert slow.lagged
