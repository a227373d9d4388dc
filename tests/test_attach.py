"""The follower in-process, against a real Redis: catch-up in blocks, the live tail, and the
contract with its caller (it never waits; it says when another block follows at once)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis

from models.chunklog import ChunkLog
from models.events import CHUNK, DONE, Event
from ops.redis_server import EmbeddedRedis
from web.attach import Follower, Snapshot
from web.catchup import BlockCache
from web.hub import Hub


@pytest.fixture
def log(redis_client: redis.Redis) -> ChunkLog:
    return ChunkLog(redis_client)


@pytest.fixture
def hub(redis_server: EmbeddedRedis, redis_client: redis.Redis) -> Iterator[Hub]:
    h = Hub(f"redis://127.0.0.1:{redis_server.port}/2", redis_client, check_interval_s=3600)
    yield h
    h.stop()


def no_snapshot() -> Snapshot:
    raise AssertionError("the log has everything: SQL is not read")


def follower(log: ChunkLog, hub: Hub, sid: str) -> Follower:
    return Follower(log, hub, BlockCache(log, block=5), sid, no_snapshot, threading.Event())


def written(log: ChunkLog, sid: str, n: int) -> int:
    log.init(sid)
    attempt = log.claim(sid, "t", 5).attempt
    log.append_many(sid, attempt, [Event(s, CHUNK, text=f"<{s}>") for s in range(1, n + 1)])
    return attempt


def test_catch_up_says_when_another_block_follows_then_never_waits(log: ChunkLog, hub: Hub) -> None:
    written(log, "a", 10)  # the log ends exactly at a block's end, and the stream is live
    f = follower(log, hub, "a")
    events = f.follow(0, finished=False)
    first = next(events)
    assert first is not None and (first.first, first.last, f.more) == (1, 5, True)
    second = next(events)  # full too, but nothing follows it yet: not to be held
    assert second is not None and (second.first, second.last, f.more) == (6, 10, False)
    # Nothing more for now: the follower yields None rather than waiting.
    assert next(events) is None and not f.more
    events.close()


def test_the_tail_follows_the_catch_up_and_ends_at_the_terminal_event(
    log: ChunkLog, hub: Hub
) -> None:
    attempt = written(log, "b", 3)
    f = follower(log, hub, "b")
    events = f.follow(1, finished=False)
    part = next(events)
    assert part is not None and [e.seq for e in part.events] == [2, 3] and not f.more
    assert next(events) is None
    log.append(
        "b", attempt, Event(4, CHUNK, text="<4>")
    )  # published: the hub offers it to the follower
    assert f.wake.wait(30)
    batch = next(events)
    while batch is None:  # the subscription's confirmation may come first (a re-read)
        assert f.wake.wait(30)
        batch = next(events)
    assert [e.seq for e in batch.events] == [4]
    log.append("b", attempt, Event(5, DONE, message_id="m"))
    assert f.wake.wait(30)
    rest = [b for b in events if b is not None]
    assert [e.seq for b in rest for e in b.events] == [5]
