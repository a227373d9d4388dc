"""Worker CPU per upstream chunk for each transport, as the worker reads: under gevent, many
answers at once, each paced like a model streaming tokens.

The benchmarks' fake upstream (bench/upstream.py, one process of its own) streams ``streams``
answers at once, ``rate`` chunks a second each, staggered, as the latency workload does; this
process (gevent, monkey-patched like a Celery worker) reads them through relay's real
generator (``OpenAIChatGenerator``) with each transport in turn and measures only its own CPU
time (``time.process_time``) over the whole run. Runs are interleaved so drift on a shared
machine hits every transport alike. Prints one JSON object.

    .venv/bin/python -m bench.upstream_read [--streams 100] [--chunks 200] [--rate 20] [--repeat 3]
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

# ruff: noqa: E402  (the imports below must see the patched socket)
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

import gevent

from bench.upstream_stream import plan_message
from models.settings import Settings
from workers.generators import GenerationRequest, Turn
from workers.generators.openai_chat import TRANSPORTS, OpenAIChatGenerator

ROOT = Path(__file__).resolve().parent.parent


def read_all(generator: OpenAIChatGenerator, streams: int, chunks: int, rate: float) -> int:
    """Read ``streams`` answers at once; return how many pieces arrived."""
    counts = [0] * streams

    def one(s: int) -> None:
        offset_ms = s * 1000.0 / rate / streams if rate else 0.0
        text = plan_message(s, chunks, rate, offset_ms, hold=False, gate=False)
        request = GenerationRequest(f"bench-{s}", (Turn("user", text),), model="bench")
        counts[s] = sum(1 for _ in generator.generate(request))

    gevent.joinall([gevent.spawn(one, s) for s in range(streams)], raise_error=True)
    return sum(counts)


def measure(generator: OpenAIChatGenerator, streams: int, chunks: int, rate: float) -> float:
    """µs of this process's CPU per piece read."""
    started = time.process_time()
    pieces = read_all(generator, streams, chunks, rate)
    spent = time.process_time() - started
    if pieces != streams * chunks:
        raise RuntimeError(f"read {pieces} pieces of {streams * chunks}")
    return spent / pieces * 1e6


def run(streams: int, chunks: int, rate: float, repeat: int) -> dict[str, Any]:
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.upstream"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline().split()[1])
        base = replace(
            Settings(), generator="openai", openai_base_url=f"http://127.0.0.1:{port}/v1",
            openai_retries=0,
        )  # fmt: skip
        generators = {
            name: OpenAIChatGenerator(replace(base, openai_transport=name)) for name in TRANSPORTS
        }
        for generator in generators.values():  # warm: connections, imports, caches
            read_all(generator, min(streams, 10), 20, 0)
        runs: dict[str, list[float]] = {name: [] for name in generators}
        for _ in range(repeat):
            for name, generator in generators.items():
                runs[name].append(measure(generator, streams, chunks, rate))
    finally:
        server.kill()
        server.wait()
    return {
        "config": {
            "streams": streams, "chunks": chunks, "rate": rate, "repeat": repeat,
            "python": platform.python_version(), "cpus": os.cpu_count(),
            **{pkg: metadata.version(pkg) for pkg in ("openai", "httpx", "urllib3", "gevent")},
        },
        "cpu_us_per_chunk": {
            name: {"median": round(statistics.median(r), 1), "runs": [round(x, 1) for x in r]}
            for name, r in runs.items()
        },
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="chunks per second per answer")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(run(args.streams, args.chunks, args.rate, args.repeat), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
