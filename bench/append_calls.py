"""Redis's and the worker's CPU per append: a script call per stream against one for all.

The worker's flusher sends every stream's pending events in one round trip
(workers/appender.py). On one Redis server that round trip is one ``APPEND_ALL`` script call
for all of them (``all``); on a Redis Cluster, and before, it is a pipeline of an ``APPEND``
call per stream (``each``). This starts a Redis server of its own, claims ``--streams``
streams and appends ``--events`` chunk events to each of them per round trip, ``--rounds``
round trips, through relay's real commands on the appender's own kind of connection
(``PinnedConnection``); it counts the server's CPU (``INFO cpu``) and this process's
(``time.process_time``) per appended event. Arms alternate, ``--repeat`` times each.
Prints one JSON object.

    .venv/bin/python -m bench.append_calls [--streams 200] [--events 1,4] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import uuid
from pathlib import Path
from time import process_time
from typing import Any

import redis

from bench.redisd import redis_binary
from models.chunklog import ChunkLog
from models.events import CHUNK, Event
from models.redisconn import PinnedConnection
from ops.redis_server import EmbeddedRedis

ARMS = ("each", "all")


def server_cpu_s(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def one_run(
    log: ChunkLog, arm: str, streams: int, events: int, rounds: int, chars: int
) -> dict[str, float]:
    """Append to fresh streams; CPU per event (µs) of the server and of this process."""
    ids = [f"bench-{uuid.uuid4().hex}" for _ in range(streams)]
    attempts = {}
    for sid in ids:
        log.init(sid)
        attempts[sid] = log.claim(sid, "bench", 60).attempt
    log.load_scripts()
    conn = PinnedConnection(log.redis)  # type: ignore[arg-type]
    server_before, mine = server_cpu_s(log.redis), 0.0  # type: ignore[arg-type]
    seq, piece = 0, "x" * chars
    for _ in range(rounds):
        work = [
            (
                sid,
                attempts[sid],
                [Event(seq + i, CHUNK, text=piece) for i in range(1, events + 1)],
            )
            for sid in ids
        ]
        started = process_time()
        if arm == "all":
            replies = ChunkLog.append_all_replies(
                conn.pipeline([log.append_all_command(work)])[0], len(work)
            )
        else:
            replies = conn.pipeline([log.append_command(*w) for w in work])
        mine += process_time() - started
        assert all(isinstance(r, list) and r[0] == "ok" for r in replies), replies[:3]
        seq += events
    server = server_cpu_s(log.redis) - server_before  # type: ignore[arg-type]
    conn.conn.disconnect()
    log.redis.delete(*[k for sid in ids for k in log._keys(sid)])
    appended = streams * events * rounds
    return {
        "redis_us_per_event": round(server / appended * 1e6, 2),
        "client_us_per_event": round(mine / appended * 1e6, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=200, help="streams per round trip")
    parser.add_argument("--events", default="1,4", help="events per stream per round trip")
    parser.add_argument("--rounds", type=int, default=200, help="round trips per run")
    parser.add_argument("--chars", type=int, default=20, help="characters per chunk")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(Path(tmp), binary=redis_binary()).start()
        try:
            client = redis.Redis.from_url(server.url, decode_responses=True)
            log = ChunkLog(client)
            for arm in ARMS:  # load the scripts, warm the caches
                one_run(log, arm, args.streams, 1, 10, args.chars)
            for events in (int(e) for e in args.events.split(",")):
                runs: dict[str, dict[str, list[float]]] = {
                    arm: {"redis_us_per_event": [], "client_us_per_event": []} for arm in ARMS
                }
                for _ in range(args.repeat):
                    for arm in ARMS:
                        got = one_run(log, arm, args.streams, events, args.rounds, args.chars)
                        for key, value in got.items():
                            runs[arm][key].append(value)
                results[str(events)] = {
                    arm: {
                        key: {"runs": values, "median": statistics.median(values)}
                        for key, values in figures.items()
                    }
                    for arm, figures in runs.items()
                }
            version = client.info("server")["redis_version"]
            client.close()
        finally:
            server.stop()
    print(
        json.dumps(
            {
                "benchmark": "append_calls",
                "redis_server": version,
                "config": {
                    "streams": args.streams,
                    "rounds": args.rounds,
                    "chars": args.chars,
                    "repeat": args.repeat,
                },
                "host": {"cpu": platform.processor() or platform.machine()},
                "results": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
