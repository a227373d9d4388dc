"""The follower in-process, against a real Redis: catch-up in blocks, the live tail, and the
contract with its caller (it never waits; it says when another block follows at once)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis

from models import keys
from models.chunklog import ChunkLog
from models.events import CANCELLED, CHUNK, DONE, Event
from ops.redis_server import EmbeddedRedis
from tests.conftest import command_calls
from web.attach import Followed, Follower, Snapshot
from web.catchup import BlockCache
from web.frames import Batch, Notice
from web.hub import Hub


@pytest.fixture(scope="module")
def redis_server(counted_redis_server: EmbeddedRedis) -> EmbeddedRedis:
    """A server of this module's own: its tests count XRANGE and EXISTS calls."""
    return counted_redis_server


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
    """``more`` (the caller may hold the block to write it with the next) only when the next
    block is kept in this process: a block never waits for a read from Redis."""
    written(log, "a", 10)  # the log ends exactly at a block's end, and the stream is live
    blocks = BlockCache(log, block=5)
    seen = []
    for _ in range(2):  # a cold read, then one through the blocks it kept
        f = Follower(log, hub, blocks, "a", no_snapshot, threading.Event())
        events = f.follow(0, finished=False)
        for _block in range(2):
            batch = next(events)
            assert batch is not None
            seen.append((batch.first, batch.last, f.more))
        # Nothing more for now: the follower yields None rather than waiting.
        assert next(events) is None and not f.more
        events.close()
    # Cold: each block goes out before the next is read. Kept: the first may wait for the
    # second; the second is full too, but nothing follows it yet (the live end).
    assert seen == [(1, 5, False), (6, 10, False), (1, 5, True), (6, 10, False)]


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


def next_item(f: Follower, events: Followed) -> Batch | Notice:
    """The follower's next batch or notice, waiting for the hub as a viewer would."""
    item = next(events)
    while item is None:  # nothing yet (or a re-read after the subscription's confirmation)
        assert f.wake.wait(30)
        item = next(events)
    return item


def test_a_queued_answer_tells_its_place_and_then_streams_without_a_gap(
    log: ChunkLog, hub: Hub
) -> None:
    """A queue notice (no seq) at attach when the place is known, another for each new place
    the sweeper publishes, none once the answer has started; the events stay 1..n."""
    log.init("q")
    assert log.queue_notice("q", '{"type":"queued","position":2,"etaSeconds":9}')
    f = follower(log, hub, "q")
    events = f.follow(0, finished=False)
    first = next(events)
    assert isinstance(first, Notice) and first.fields == {
        "type": "queued", "position": 2, "etaSeconds": 9,
    }  # fmt: skip
    assert next(events) is None
    assert log.queue_notice("q", '{"type":"queued","position":1}')
    moved = next_item(f, events)
    assert isinstance(moved, Notice) and moved.fields == {"type": "queued", "position": 1}
    attempt = log.claim("q", "t", 5).attempt
    # Claimed: a notice computed before the claim is refused, so none can follow the events.
    assert not log.queue_notice("q", '{"type":"queued","position":1}')
    assert log.queue_place("q") is None
    log.append_many("q", attempt, [Event(1, CHUNK, text="a"), Event(2, DONE, message_id="m")])
    rest = [b for b in events if b is not None]
    assert all(isinstance(b, Batch) for b in rest)
    assert [e.seq for b in rest if isinstance(b, Batch) for e in b.events] == [1, 2]


def test_a_stream_queued_again_tells_its_place_at_the_log_s_end(log: ChunkLog, hub: Hub) -> None:
    """An admin retry queues an ended answer again: a viewer at the log's end gets the place
    at once; one that catches up first gets it once it is at the end."""
    attempt = written(log, "r", 3)
    log.append("r", attempt, Event(4, DONE, message_id="m"))
    assert log.queue_notice("r", '{"type":"queued","position":5}') is False  # not queued
    assert log.reopen("r", "t2")[0] == "reopened"  # seq 5: resumed; queued again
    assert log.queue_notice("r", '{"type":"queued","position":3}')
    at_end = follower(log, hub, "r").follow(5, finished=False)
    told = next(at_end)
    assert isinstance(told, Notice) and told.fields["position"] == 3 and told.at == 5
    at_end.close()
    behind = follower(log, hub, "r").follow(2, finished=False)
    caught_up = next(behind)
    assert isinstance(caught_up, Batch) and (caught_up.first, caught_up.last) == (3, 5)
    told = next(behind)
    assert isinstance(told, Notice) and told.fields["position"] == 3
    behind.close()


def test_an_ended_answer_s_last_block_is_kept_and_a_retry_after_it_still_reaches_viewers(
    log: ChunkLog, hub: Hub, redis_client: redis.Redis
) -> None:
    """The block that ends with the terminal event is read from Redis once and kept like a
    full block. An admin retry continues the stream after that event, in the same block: a
    viewer that catches up through the kept copy still gets every event after it, once."""
    attempt = written(log, "k", 7)  # blocks of 5: [1..5], [6, 7, 8 cancelled]
    log.append("k", attempt, Event(8, CANCELLED, reason=""))
    blocks = BlockCache(log, block=5)

    def caught_up(after: int) -> list[int]:
        return followed(Follower(log, hub, blocks, "k", no_snapshot, threading.Event()), after)

    before = command_calls(redis_client, "xrange")
    assert caught_up(0) == [1, 2, 3, 4, 5, 6, 7, 8]
    reads = command_calls(redis_client, "xrange") - before
    assert caught_up(0) == [1, 2, 3, 4, 5, 6, 7, 8]
    # Again, only what follows the terminal event is read (to see whether a retry follows).
    assert command_calls(redis_client, "xrange") - before == reads + 1
    assert blocks.stats()["blocks"] == 2
    assert log.reopen("k", "t2")[0] == "reopened"  # seq 9: resumed
    attempt = log.claim("k", "t2", 5).attempt
    log.append_many("k", attempt, [Event(10, CHUNK, text="<10>"), Event(11, DONE, message_id="m")])
    assert caught_up(0) == list(range(1, 12))


def followed(f: Follower, after: int, finished: bool = False) -> list[int]:
    """The seqs ``f`` yields from ``after`` to the end, waiting as a viewer would."""
    seqs: list[int] = []
    for item in f.follow(after, finished=finished):
        if item is None:  # nothing now: wait for the hub
            assert f.wake.wait(30)
            continue
        assert isinstance(item, Batch)
        seqs += [e.seq for e in item.events]
    return seqs


def test_an_ended_answer_in_kept_blocks_costs_one_read_after_its_end(
    log: ChunkLog, hub: Hub, redis_client: redis.Redis
) -> None:
    """Once this process keeps an ended answer's blocks through its terminal event, a viewer
    of it from the start asks Redis nothing before that event: not whether the log exists,
    not its blocks; only what follows the terminal event (a retry). The kept blocks serve it
    exactly even after the log is gone."""
    attempt = written(log, "h", 7)
    log.append("h", attempt, Event(8, DONE, message_id="m"))
    blocks = BlockCache(log, block=5)

    def viewer() -> list[int]:
        return followed(Follower(log, hub, blocks, "h", no_snapshot, threading.Event()), 0, True)

    assert viewer() == list(range(1, 9))
    before = (command_calls(redis_client, "xrange"), command_calls(redis_client, "exists"))
    assert viewer() == list(range(1, 9))
    after = (command_calls(redis_client, "xrange"), command_calls(redis_client, "exists"))
    assert after == (before[0] + 1, before[1])
    redis_client.delete(keys.log_key("h"), keys.state_key("h"))  # the log expired
    assert viewer() == list(range(1, 9))


def commands(client: redis.Redis, name: str) -> int:
    stats = client.info("commandstats").get(f"cmdstat_{name}", {})
    return int(stats.get("calls", 0)) if isinstance(stats, dict) else 0
