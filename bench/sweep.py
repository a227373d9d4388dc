"""The sweeper at scale: how long one pass takes over N active streams.

Run by ``python -m bench sweep`` with the code under test's own interpreter
(``python bench/sweep.py <redis url>`` from that checkout's root); prints one JSON object.
The streams live in a migrated SQLite file of the run's own (or ``BENCH_SWEEP_DATABASE_URL``)
and in the given Redis, as a worker would leave them: running with a fresh heartbeat (the
common case: the pass finds nothing to do), then with a tenth of the writers dead (the pass
re-sends their tasks; sending is counted, not published, so the figure is the sweeper's own).

The process is monkey-patched with gevent like a Celery worker, where a pass shares one
event loop with the answers being written: beside each pass's time, ``longest_hold_ms`` is
the longest the pass kept the loop from a greenlet that asks for it every millisecond (what
a chunk arriving during the pass may wait, over the 1 ms the ticker sleeps).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

# ruff: noqa: E402  (the imports below must see the patched socket)
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import gevent
import redis
from sqlalchemy import insert

from models import keys
from models.chunklog import ChunkLog
from models.db import make_engine, make_sessionmaker
from models.lifecycle import Sweeper
from models.migrate import upgrade
from models.tables import Chat, Message, Stream, User, new_id

STREAMS = int(os.environ.get("BENCH_SWEEP_STREAMS", "5000"))
PASSES = 5


def seed(database_url: str, client: redis.Redis, n: int) -> list[str]:
    """n running streams in SQL and in Redis, each with a fresh heartbeat."""
    engine = make_engine(database_url)
    user = new_id()
    chats = [new_id() for _ in range(n)]
    messages = [new_id() for _ in range(n)]
    streams = [new_id() for _ in range(n)]
    with engine.begin() as conn:
        conn.execute(insert(User), [{"id": user, "kind": "guest"}])
        conn.execute(insert(Chat), [{"id": c, "user_id": user, "title": "t"} for c in chats])
        conn.execute(
            insert(Message),
            [{"id": m, "chat_id": c, "position": 1, "role": "assistant", "status": "streaming"}
             for m, c in zip(messages, chats, strict=True)],
        )  # fmt: skip
        conn.execute(
            insert(Stream),
            [{"id": s, "chat_id": c, "message_id": m, "status": "running", "attempt": 1,
              "task_id": s, "seq_layout": json.dumps(list(range(1, 200)))}
             for s, c, m in zip(streams, chats, messages, strict=True)],
        )  # fmt: skip
    engine.dispose()
    beat(client, streams)
    return streams


def beat(client: redis.Redis, streams: list[str], hb_ms: int | None = None) -> None:
    seconds, micros = client.time()  # type: ignore[misc]
    now = hb_ms if hb_ms is not None else int(seconds) * 1000 + int(micros) // 1000
    with client.pipeline(transaction=False) as pipe:
        for sid in streams:
            pipe.hset(
                keys.state_key(sid),
                mapping={"status": "running", "attempt": 1, "hb": now, "task": sid, "seq": 200},
            )
        pipe.execute()


class Ticker:
    """A greenlet that sleeps 1 ms at a time and keeps the longest gap between its wake-ups
    (the longest anything else held the event loop)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self._greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        last = time.perf_counter()
        while True:
            gevent.sleep(0.001)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            last = now

    def reset(self) -> None:
        gevent.sleep(0.005)  # let it wake once, so a gap from before does not count
        self.longest = 0.0

    def stop(self) -> None:
        self._greenlet.kill()


def passes(sweeper: Sweeper, count: int) -> tuple[list[float], list[float], Any]:
    """Each pass's time and the longest it held the loop, and the last pass's report."""
    times, holds, report = [], [], None
    ticker = Ticker()
    try:
        for _ in range(count):
            ticker.reset()
            started = time.perf_counter()
            report = sweeper.sweep()
            times.append(time.perf_counter() - started)
            gevent.sleep(0.002)  # the ticker's wake-up after the pass ends the last gap
            holds.append(ticker.longest)
    finally:
        ticker.stop()
    return times, holds, report


def figures(times: list[float], holds: list[float]) -> dict[str, Any]:
    ms = sorted(t * 1000 for t in times)
    return {
        "p50_ms": round(statistics.median(ms), 1),
        "max_ms": round(ms[-1], 1),
        "longest_hold_ms": [round(h * 1000, 1) for h in holds],  # per pass, the first cold
    }


def main(redis_url: str) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    with tempfile.TemporaryDirectory() as tmp:
        database_url = os.environ.get("BENCH_SWEEP_DATABASE_URL") or f"sqlite:///{tmp}/sweep.db"
        upgrade(database_url)
        streams = seed(database_url, client, STREAMS)
        sent: list[str] = []
        sweeper = Sweeper(
            ChunkLog(client), make_sessionmaker(make_engine(database_url)),
            lambda sid, _task: sent.append(sid), stale_after_s=8.0,
        )  # fmt: skip
        idle, idle_holds, report = passes(sweeper, PASSES)
        assert report is not None and report.checked == STREAMS and not sent
        dead = streams[: STREAMS // 10]
        beat(client, dead, hb_ms=1)  # their writers died long ago
        (with_dead,), dead_holds, report = passes(sweeper, 1)
        assert sorted(report.requeued) == sorted(dead), "every dead writer's task is sent"
    return {
        "config": {
            "streams": STREAMS,
            "database": database_url.split(":", 1)[0],
            "passes": PASSES,
            "dead_writers": len(dead),
        },
        "all_live": figures(idle, idle_holds),
        "tenth_dead_ms": round(with_dead * 1000, 1),
        "tenth_dead_longest_hold_ms": round(dead_holds[0] * 1000, 1),
        "sweep_interval_ms": 2000,
        "resent": len(sent),
    }


if __name__ == "__main__":
    sys.path.insert(0, str(Path.cwd()))
    print(json.dumps(main(sys.argv[1])))
