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
from collections.abc import Iterator
from itertools import pairwise
from typing import Any

import pytest
import redis
from sqlalchemy.orm import Session

from models import store
from models.settings import Settings
from tests.inproc import in_process_worker
from workers.generation import CHECKPOINT_JITTER, run_generation

INTERVAL = 0.4
ANSWERS = 16
PIECES = 60
PIECE_EVERY_S = 0.02


def test_answers_whose_first_pieces_come_together_checkpoint_at_different_moments(
    fresh_database_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sixteen answers wait longer than the checkpoint interval for their first piece (a
    model slow to start), then stream together. Each answer's checkpoints start from its
    first piece at a random phase: their first checkpoints spread over the interval, and no
    two checkpoints of one answer come closer than 1 - CHECKPOINT_JITTER intervals."""
    settings = Settings(
        database_url=fresh_database_url, redis_url="", checkpoint_interval_s=INTERVAL,
        heartbeat_interval_s=0.5, heartbeat_stale_s=3.0, backend_budget_s=1.0,
    )  # fmt: skip
    checkpoints: dict[str, list[float]] = defaultdict(list)
    copy = store.checkpoint

    def recorded(db: Session, stream_id: str, *args: Any) -> bool:
        checkpoints[stream_id].append(time.monotonic())
        return copy(db, stream_id, *args)

    monkeypatch.setattr(store, "checkpoint", recorded)  # relay's own, called through
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
