"""Worker CPU per checkpoint: an answer's whole copy against only what came since the last.

A running answer is copied to SQL every RELAY_CHECKPOINT_INTERVAL_S (workers/generation.py
``LogWriter.store_checkpoint``). This grows one answer piece by piece (``--chars`` each) in
a fresh database (a SQLite file in WAL mode as relay configures it, or ``--database-url``'s
PostgreSQL in a schema of its own, dropped after) and checkpoints it every ``--every``
pieces through relay's real statements and engine, the way the worker does: each
checkpoint on a Core connection of the engine. ``whole`` writes the text and layout whole
every time (``store.checkpoint``); ``more`` writes the first whole and then adds
(``store.checkpoint_more``). Only this process's CPU (``time.process_time``) inside the
checkpoints is counted; arms alternate, ``--repeat`` times each. Prints one JSON object.

    .venv/bin/python -m bench.checkpoint [--pieces 800,4000] [--repeat 3] [--database-url URL]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from time import perf_counter, process_time
from typing import Any

from sqlalchemy import text as sql
from sqlalchemy.engine import Engine

from models import store
from models.db import make_engine
from models.tables import Base, Chat, Message, Stream, User

ARMS = ("whole", "more")


@contextmanager
def database(url: str | None) -> Iterator[Engine]:
    """relay's engine on a fresh database: a SQLite file, or a PostgreSQL schema of its own."""
    if url is None:
        with tempfile.TemporaryDirectory() as tmp:
            engine = make_engine(f"sqlite:///{Path(tmp) / 'relay.db'}")
            Base.metadata.create_all(engine)
            try:
                yield engine
            finally:
                engine.dispose()
        return
    schema = f"relay_bench_{uuid.uuid4().hex[:8]}"
    admin = make_engine(url)
    with admin.begin() as conn:
        conn.execute(sql(f'CREATE SCHEMA "{schema}"'))
    joiner = "&" if "?" in url else "?"
    engine = make_engine(f"{url}{joiner}options=-csearch_path%3D{schema}")
    try:
        Base.metadata.create_all(engine)
        yield engine
    finally:
        engine.dispose()
        with admin.begin() as conn:
            conn.execute(sql(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def new_stream(engine: Engine) -> tuple[str, str]:
    """A running stream (attempt 1) and its answer, as a worker finds them."""
    ids = {name: uuid.uuid4().hex for name in ("user", "chat", "message", "stream")}
    with engine.begin() as conn:
        conn.execute(User.__table__.insert().values(id=ids["user"], kind="guest"))
        conn.execute(Chat.__table__.insert().values(id=ids["chat"], user_id=ids["user"], title="b"))
        conn.execute(
            Message.__table__.insert().values(
                id=ids["message"], chat_id=ids["chat"], position=1, role="assistant",
                status="pending", content="",
            )
        )  # fmt: skip
        conn.execute(
            Stream.__table__.insert().values(
                id=ids["stream"], chat_id=ids["chat"], message_id=ids["message"], status="queued"
            )
        )
    with engine.connect() as conn:
        writer = store.fenced_writer(conn)  # as the worker writes
        assert store.mark_running(writer, ids["stream"], ids["message"], 1, "bench")
    return ids["stream"], ids["message"]


def one_answer(engine: Engine, arm: str, pieces: int, every: int, chars: int) -> dict[str, Any]:
    """Grow one answer and checkpoint it; CPU per checkpoint (µs) and SQL's copy checked."""
    sid, mid = new_stream(engine)
    parts: list[str] = []
    layout: list[Any] = []
    length = 0
    saved: tuple[int, int] | None = None
    spent, waited, count = 0.0, 0.0, 0
    for n in range(1, pieces + 1):
        piece = f"{n:>{chars}}"[:chars]
        parts.append(piece)
        length += len(piece)
        layout.append(length)
        if n % every:
            continue
        started, began = process_time(), perf_counter()
        with engine.connect() as plain:
            conn = store.fenced_writer(plain)  # as the worker writes
            if arm == "more" and saved is not None:
                ok = store.checkpoint_more(
                    conn, sid, mid, 1, saved[1], layout[saved[1] :], "".join(parts[saved[0] :])
                )
            else:
                ok = store.checkpoint(conn, sid, mid, 1, "".join(parts), layout)
        spent += process_time() - started
        waited += perf_counter() - began
        count += 1
        assert ok, "the checkpoint was refused"
        saved = (len(parts), len(layout))
    with engine.connect() as conn:
        content = conn.execute(
            sql("SELECT content FROM messages WHERE id = :m"), {"m": mid}
        ).scalar_one()
    assert content == "".join(parts[: saved[0] if saved else 0]), "SQL's copy differs"
    return {
        "checkpoints": count,
        "cpu_us_per_checkpoint": round(spent / count * 1e6, 1),
        "wall_us_per_checkpoint": round(waited / count * 1e6, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pieces", default="800,4000", help="answer lengths, in pieces")
    parser.add_argument("--every", type=int, default=40, help="pieces between checkpoints")
    parser.add_argument("--chars", type=int, default=20, help="characters per piece")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--database-url", default=None, help="PostgreSQL (default: SQLite)")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    with database(args.database_url) as engine:
        for arm in ARMS:  # compile the statements, warm the caches
            one_answer(engine, arm, 4 * args.every, args.every, args.chars)
        for pieces in (int(p) for p in args.pieces.split(",")):
            runs: dict[str, list[float]] = {arm: [] for arm in ARMS}
            walls: dict[str, list[float]] = {arm: [] for arm in ARMS}
            for _ in range(args.repeat):
                for arm in ARMS:
                    got = one_answer(engine, arm, pieces, args.every, args.chars)
                    runs[arm].append(got["cpu_us_per_checkpoint"])
                    walls[arm].append(got["wall_us_per_checkpoint"])
            medians = {arm: statistics.median(values) for arm, values in runs.items()}
            results[str(pieces)] = {
                "answer_chars": pieces * args.chars,
                "checkpoints_per_answer": pieces // args.every,
                "cpu_us_per_checkpoint": runs,
                "median_us": medians,
                "wall_median_us": {arm: statistics.median(v) for arm, v in walls.items()},
                "more_over_whole": round(medians["more"] / medians["whole"], 3),
            }
    print(
        json.dumps(
            {
                "benchmark": "checkpoint",
                "database": "postgresql" if args.database_url else "sqlite",
                "config": {"every": args.every, "chars": args.chars, "repeat": args.repeat},
                "host": {"cpu": platform.processor() or platform.machine()},
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
