"""Catch-up blocks against a real Redis: read once per process, shared, single flight."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

import pytest
import redis

from models.chunklog import ChunkLog
from models.events import CHUNK, Event
from ops.redis_server import EmbeddedRedis
from tests.conftest import command_calls
from web.catchup import BlockCache
from web.frames import Batch

T = TypeVar("T")


class GatedLog(ChunkLog):
    """A log whose reads wait at a gate before asking Redis: a Redis slow to answer, for
    exactly as long as a test needs (every command still goes to the real server)."""

    def __init__(self, client: redis.Redis) -> None:
        super().__init__(client)
        self.gate = threading.Event()
        self.gate.set()

    def read_columns(self, stream_id: str, after: int, last: int) -> tuple[list[str], list[str]]:
        self.gate.wait()
        return super().read_columns(stream_id, after, last)

    def exists(self, stream_id: str) -> bool:
        self.gate.wait()
        return super().exists(stream_id)


@pytest.fixture(scope="module")
def redis_server(counted_redis_server: EmbeddedRedis) -> EmbeddedRedis:
    """A server of this module's own: its tests count XRANGE and EXISTS calls."""
    return counted_redis_server


@pytest.fixture
def log(redis_client: redis.Redis) -> GatedLog:
    return GatedLog(redis_client)


def written(log: ChunkLog, sid: str, n: int) -> None:
    log.init(sid)
    attempt = log.claim(sid, "t", 5).attempt
    events = [Event(seq, CHUNK, text=f"<{seq}>") for seq in range(1, n + 1)]
    for start in range(0, n, 100):
        log.append_many(sid, attempt, events[start : start + 100])


def texts(batch: Batch | None) -> list[str]:
    assert batch is not None
    return batch.datas


def test_full_blocks_are_read_once_and_shared(log: ChunkLog, redis_client: redis.Redis) -> None:
    written(log, "a", 25)
    cache = BlockCache(log, block=10)
    before = command_calls(redis_client, "xrange")
    first = cache.read("a", 0)
    assert cache.read("a", 0) is first  # the same batch, encodings and all
    assert texts(first) == [f"<{s}>" for s in range(1, 11)]
    assert command_calls(redis_client, "xrange") - before == 1
    assert texts(cache.read("a", 10))[0] == "<11>"
    tail = cache.read("a", 20)  # not full: the live end, read each time and not kept
    assert texts(tail) == [f"<{s}>" for s in range(21, 26)]
    assert cache.read("a", 20) is not tail
    assert cache.stats()["blocks"] == 2
    assert cache.read("a", 30) is None


def test_a_mid_block_read_gets_the_rest_of_its_block(log: ChunkLog) -> None:
    written(log, "b", 25)
    cache = BlockCache(log, block=10)
    part = cache.read("b", 13)
    assert part is not None and (part.first, part.last) == (14, 20)
    assert cache.stats()["blocks"] == 0


def read_at_once(cache: BlockCache, sid: str, viewers: int, after: int = 0) -> list[Batch | None]:
    """``viewers`` threads read the stream after ``after``, all asking before the first read
    gets its answer; their results."""
    return at_once(cache, viewers, lambda: cache.read(sid, after))


def at_once(cache: BlockCache, viewers: int, ask: Callable[[], T]) -> list[T]:
    """``viewers`` threads call ``ask`` while the cache's log holds its reads at the gate,
    which opens once every thread has an answer or waits inside the cache (reading, or
    waiting for a read in flight): however slowly the threads start, they all ask at once."""
    assert isinstance(cache.log, GatedLog)
    results: list[T] = []
    cache.log.gate.clear()
    threads = [threading.Thread(target=lambda: results.append(ask())) for _ in range(viewers)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while (inside := cache.stats()["reading"] + cache.stats()["waiting"]) + len(
            results
        ) < viewers:
            assert time.monotonic() < deadline, f"{inside} of {viewers} threads in the cache"
            time.sleep(0.002)
    finally:
        cache.log.gate.set()
        for thread in threads:
            thread.join()
    return results


def test_viewers_asking_at_once_share_one_read(log: ChunkLog, redis_client: redis.Redis) -> None:
    written(log, "c", 500)
    cache = BlockCache(log, block=500)
    before = command_calls(redis_client, "xrange")
    results = read_at_once(cache, "c", 20)
    assert len(results) == 20 and all(
        r is not None and r.datas == texts(results[0]) for r in results
    )
    assert command_calls(redis_client, "xrange") - before == 1  # the first, kept: the rest take it


def test_kept_blocks_expire_and_the_budget_holds(log: ChunkLog) -> None:
    written(log, "d", 40)
    cache = BlockCache(log, block=10, ttl_s=0.2)
    first = cache.read("d", 0)
    time.sleep(0.3)
    assert cache.read("d", 0) is not first
    one_block = cache.read("d", 10)
    assert one_block is not None
    texts_size = one_block.nbytes()
    small = BlockCache(log, block=10, max_bytes=texts_size * 3 // 2)
    for after in (0, 10, 20):
        small.read("d", after)
    assert small.stats()["blocks"] == 1  # the newest; older ones went first
    assert small.read("d", 20) is small.read("d", 20)


def test_viewers_flagged_at_once_share_reads_of_a_live_block(
    log: ChunkLog, redis_client: redis.Redis
) -> None:
    written(log, "e", 7)  # the live end: not a full block, never kept
    cache = BlockCache(log, block=500)
    before = command_calls(redis_client, "xrange")
    results = read_at_once(cache, "e", 50)
    assert [texts(r) for r in results] == [[f"<{s}>" for s in range(1, 8)]] * 50
    # the one in flight and the next, not fifty
    assert command_calls(redis_client, "xrange") - before == 2
    assert cache.stats()["blocks"] == 0


def test_viewers_at_the_end_of_an_answer_share_their_last_reads(
    log: ChunkLog, redis_client: redis.Redis
) -> None:
    """A hundred viewers of an ended answer arriving together: whether its log still exists
    and what follows their cursor mid-block (the check after a terminal event) are asked of
    Redis twice each (the first asker's read, then one for all who asked while it flew), not
    a hundred times."""
    written(log, "f", 23)
    cache = BlockCache(log, block=10)
    before = command_calls(redis_client, "exists")
    assert at_once(cache, 100, lambda: cache.exists("f")) == [True] * 100
    assert command_calls(redis_client, "exists") - before == 2
    assert at_once(cache, 100, lambda: cache.exists("nope")) == [False] * 100
    before = command_calls(redis_client, "xrange")
    rests = read_at_once(cache, "f", 100, after=21)
    assert [texts(r) for r in rests] == [["<22>", "<23>"]] * 100
    assert command_calls(redis_client, "xrange") - before == 2
    assert read_at_once(cache, "f", 100, after=23) == [None] * 100
    assert cache.stats()["blocks"] == 0  # neither kind is ever kept


def test_a_shared_mid_block_read_is_never_older_than_the_question(log: ChunkLog) -> None:
    """Never kept: an event appended after one read is in the next."""
    written(log, "g", 13)
    cache = BlockCache(log, block=10)
    assert texts(cache.read("g", 11)) == ["<12>", "<13>"]
    log.append_many("g", 1, [Event(14, CHUNK, text="<14>")])
    assert texts(cache.read("g", 11)) == ["<12>", "<13>", "<14>"]
