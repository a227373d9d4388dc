"""When a worker copies running answers to SQL (its checkpoints), in-process: relay's
``run_generation`` against a real Redis and a real database (tests/inproc.py).

A checkpoint is a database write on the worker's one event loop; with SQLite nothing else
runs meanwhile. Answers whose checkpoints fall due together stall every stream's appends at
once, every interval: the latency benchmark's tail was mostly that (docs/performance.md).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from itertools import pairwise
from typing import Any

import pytest
import redis
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from models import store
from models.settings import Settings
from tests.inproc import in_process_worker
from workers.generation import CHECKPOINT_JITTER, run_generation

INTERVAL = 0.4
ANSWERS = 16
PIECES = 60
PIECE_EVERY_S = 0.02
PIECES_SEEN = 120  # 5 ms apart: a dozen checkpoints at 0.05 s


def fast(database_url: str, checkpoint_interval_s: float) -> Settings:
    """A worker's settings with short intervals, so checkpoints come many times a second."""
    return Settings(
        database_url=database_url, redis_url="", checkpoint_interval_s=checkpoint_interval_s,
        heartbeat_interval_s=0.5, heartbeat_stale_s=3.0, backend_budget_s=1.0,
    )  # fmt: skip


def test_answers_whose_first_pieces_come_together_checkpoint_at_different_moments(
    fresh_database_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sixteen answers wait longer than the checkpoint interval for their first piece (a
    model slow to start), then stream together. Each answer's checkpoints start from its
    first piece at a random phase: their first checkpoints spread over the interval, and no
    two checkpoints of one answer come closer than 1 - CHECKPOINT_JITTER intervals."""
    settings = fast(fresh_database_url, checkpoint_interval_s=INTERVAL)
    checkpoints: dict[str, list[float]] = defaultdict(list)

    def recorded(copy: Callable[..., bool]) -> Callable[..., bool]:
        def call(db: Session, stream_id: str, *args: Any) -> bool:
            checkpoints[stream_id].append(time.monotonic())
            return copy(db, stream_id, *args)

        return call

    # relay's own, called through: the first of an answer is whole, the others add to it
    monkeypatch.setattr(store, "checkpoint", recorded(store.checkpoint))
    monkeypatch.setattr(store, "checkpoint_more", recorded(store.checkpoint_more))
    go = threading.Event()

    def script() -> Iterator[str]:
        assert go.wait(30)
        for n in range(PIECES):
            time.sleep(PIECE_EVERY_S)
            yield f"w{n} "

    with in_process_worker(fresh_database_url, redis_client, settings) as w:
        w.generator.script = script
        sids = [w.new_stream(f"answer {i}").id for i in range(ANSWERS)]
        outcomes: dict[str, str] = {}

        def run(sid: str) -> None:
            outcomes[sid] = run_generation(w.rt, sid, sid)

        threads = [threading.Thread(target=run, args=(sid,)) for sid in sids]
        for t in threads:
            t.start()
        time.sleep(1.5 * INTERVAL)  # every writer has waited longer than an interval
        go.set()
        for t in threads:
            t.join(60)
    assert outcomes == {sid: "done" for sid in sids}
    assert set(checkpoints) == set(sids)
    firsts = sorted(times[0] for times in checkpoints.values())
    # Due all at once, they would all land within a piece or two of each other.
    assert firsts[-1] - firsts[0] > INTERVAL / 2, [round(t - firsts[0], 3) for t in firsts]
    gaps = [b - a for times in checkpoints.values() for a, b in pairwise(times)]
    assert gaps, "each answer checkpoints more than once"
    assert min(gaps) >= (1 - CHECKPOINT_JITTER) * INTERVAL


def copies_in_sql(w: Any, sid: str) -> tuple[int, str, list[Any], str, list[Any]]:
    """SQL's copy of a running answer (its seq, text and layout), and the log's up to it."""
    stream, message = w.stored(sid)
    text, layout = w.rt.log.text(sid, stream.last_seq)
    return stream.last_seq, message.content, store.load_layout(stream), text, layout


def test_each_checkpoint_adds_to_the_last_and_sql_holds_the_log_up_to_its_seq(
    fresh_database_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After its first checkpoint a writer sends only what is new (``checkpoint_more``);
    between any two pieces SQL holds exactly the log's text and layout up to its seq."""
    settings = fast(fresh_database_url, checkpoint_interval_s=0.05)
    calls: list[str] = []
    whole, more = store.checkpoint, store.checkpoint_more
    monkeypatch.setattr(store, "checkpoint", lambda *a: calls.append("whole") or whole(*a))
    monkeypatch.setattr(store, "checkpoint_more", lambda *a: calls.append("more") or more(*a))
    seen: list[int] = []

    with in_process_worker(fresh_database_url, redis_client, settings) as w:
        sid = w.new_stream("checkpoints").id

        def script() -> Iterator[str]:
            for n in range(PIECES_SEEN):
                time.sleep(0.005)
                if n % 5 == 0:
                    seq, content, layout, text, expected = copies_in_sql(w, sid)
                    assert (content, layout) == (text, expected), seq
                    seen.append(seq)
                yield f"w{n}" if n % 7 else f"ü{n}😀 "  # offsets count code points

        w.generator.script = script
        assert run_generation(w.rt, sid, "task") == "done"
        final, message = w.stored(sid)
    assert calls[0] == "whole" and calls.count("whole") == 1, calls
    assert calls.count("more") >= 5, calls
    assert len(set(seen)) >= 5, seen  # the copies compared were many different checkpoints
    assert message.content == w.generator.text
    assert final.last_seq == PIECES_SEEN + 1  # the pieces and done


def test_a_checkpoint_whose_commit_went_through_unseen_is_followed_by_a_whole_one(
    fresh_database_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint that committed but answered with an outage error (the reply was lost)
    leaves SQL ahead of what the writer believes; the next addition is refused and the
    writer writes the answer whole: SQL never holds a piece twice or misses one."""
    settings = fast(fresh_database_url, checkpoint_interval_s=0.05)
    calls: list[str] = []
    whole, more = store.checkpoint, store.checkpoint_more

    def lost_reply(*args: Any) -> bool:
        calls.append("more")
        applied = more(*args)
        if calls.count("more") == 2:
            assert applied
            raise OperationalError("COMMIT", {}, Exception("server closed the connection"))
        return applied

    monkeypatch.setattr(store, "checkpoint", lambda *a: calls.append("whole") or whole(*a))
    monkeypatch.setattr(store, "checkpoint_more", lost_reply)

    with in_process_worker(fresh_database_url, redis_client, settings) as w:
        sid = w.new_stream("lost reply").id

        def script() -> Iterator[str]:
            # Long enough for the checkpoint after the lost reply (an outage's first backoff
            # is 0.25 s), the whole one after it, and one more.
            for n in range(200):
                time.sleep(0.005)
                seq, content, layout, text, expected = copies_in_sql(w, sid)
                assert (content, layout) == (text, expected), seq
                yield f"w{n} "

        w.generator.script = script
        assert run_generation(w.rt, sid, "task") == "done"
        _final, message = w.stored(sid)
    # whole, more, more (lost), more (refused: SQL is ahead), whole, more, ...
    assert calls[:5] == ["whole", "more", "more", "more", "whole"], calls
    assert "more" in calls[5:], calls
    assert message.content == w.generator.text
