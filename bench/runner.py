"""Run one workload end to end: fresh Redis and processes, hard timeout, the peer on the same
Redis, then the result file and its plot."""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from bench import peer, plot
from bench.config import Knobs
from bench.logredis import LogRedis, delta
from bench.redisd import RedisServer, redis_counters
from bench.stack import Sizing, Stack, git_describe
from bench.tools import Tools


@dataclass
class Ctx:
    """What a workload gets: knobs, its temp dir, its Redis, its deadline, its result."""

    knobs: Knobs
    tmp: Path
    redis_url: str
    redis_pid: int | None
    deadline: float
    out: dict[str, Any]
    log_redis_url: str | None = None  # RELAY_LOG_REDIS_URL (BENCH_LOG_REDIS), if not the above


Workload = Callable[[Ctx], Awaitable[dict[str, np.ndarray]]]


def log(*parts: object) -> None:
    """Print progress on stderr (stdout carries only the JSON lines)."""
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[bench {stamp}]", *parts, file=sys.stderr, flush=True)


@asynccontextmanager
async def relay_stack(ctx: Ctx, sizing: Sizing) -> AsyncIterator[Stack]:
    """Start relay's processes for the workload; stop them all (by pid) whatever happens."""
    stack = Stack(ctx.knobs.relay_root, ctx.tmp, (ctx.redis_url, ctx.redis_pid), sizing,
                  ctx.knobs.chunk_chars, Tools.from_knobs(ctx.knobs),
                  ctx.log_redis_url, ctx.knobs.bench_database_url)  # fmt: skip
    try:
        await stack.start()
        ctx.out["results"]["pids"] = dict(stack.pids)
        ctx.out["results"]["clock_check"] = await stack.clock_check()
        yield stack
    except BaseException:
        # The logs go with the temp dir: keep their ends in the result for diagnosis.
        ctx.out["results"]["log_tails"] = {c.name: c.tail(15) for c in stack.children}
        raise
    finally:
        try:
            await asyncio.shield(stack.stop())
        except BaseException:
            stack.kill()
            raise


def envelope(name: str, knobs: Knobs) -> dict[str, Any]:
    """Return the fields every result carries (the peer's JSON has the same ones)."""
    return {
        "workload": name,
        "relay": {
            "root": str(knobs.relay_root),
            "commit": git_describe(knobs.relay_root),
            "database": "postgresql" if knobs.bench_database_url else "sqlite",
        },
        "python": platform.python_version(),
        "tools": {"loadgen": knobs.bench_loadgen, "upstream": knobs.bench_upstream},
        "host": host(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config": {},
        "results": {},
    }


def host() -> dict[str, Any]:
    """Return the machine: cores, CPU model, RAM, load average."""
    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "mem_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


async def run_workload(
    name: str, fn: Workload, knobs: Knobs, file: str | None = None
) -> dict[str, Any]:
    """Run one workload and the peer's counterpart; write its JSON and PNG (as ``file``,
    the workload's name by default); return the JSON."""
    out = envelope(name, knobs)
    tmp = Path(tempfile.mkdtemp(prefix=f"relay-bench-{name}-"))
    redis = RedisServer(tmp / "redis")
    data = LogRedis(knobs.bench_log_redis, tmp / "log-redis")
    arrays: dict[str, np.ndarray] = {}
    t0 = time.monotonic()
    try:
        url = await redis.start()
        out["redis_server"] = (await redis_counters(url))["version"]
        log_url = await asyncio.to_thread(data.start)
        ctx = Ctx(knobs, tmp, url, redis.pid, t0 + knobs.timeout(name), out, log_url)
        log(f"=== {name}: relay at {out['relay']['commit']} ({knobs.relay_root})")
        limit = asyncio.timeout(knobs.timeout(name))
        before = data.counters()
        try:
            async with limit:
                arrays = await fn(ctx)
        except TimeoutError as exc:
            if not limit.expired():  # a wait inside the workload gave up, not the hard limit
                record_error(out, exc)
            else:
                out["results"].update(
                    timed_out=True, error=f"hard timeout {knobs.timeout(name):g} s"
                )
        except Exception as exc:
            record_error(out, exc)
        out["results"]["wall_s"] = round(time.monotonic() - t0, 3)
        if log_url is not None:
            out["results"]["log_redis"] = {"kind": data.kind, **delta(before, data.counters())}
        log(f"{name}: relay done in {out['results']['wall_s']} s; peer next")
        out["peer"] = await peer.run(name, knobs, url, tmp)
    finally:
        await asyncio.to_thread(data.stop)
        await redis.stop()
        if knobs.bench_keep_tmp:
            log(f"{name}: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    out["ratios"] = peer.ratios(name, out)
    write(name, out, arrays, knobs.results_dir, file)
    return out


def record_error(out: dict[str, Any], exc: BaseException) -> None:
    """Record a workload's failure in its result (and its traceback on stderr)."""
    out["results"]["error"] = repr(exc)[:1000]
    traceback.print_exception(exc, file=sys.stderr)


def write(
    name: str,
    out: dict[str, Any],
    arrays: dict[str, np.ndarray],
    results: Path,
    file: str | None = None,
) -> None:
    """Write bench/results/<file>.json and, from the samples, <file>.png (``file``: the
    workload's name unless given)."""
    file = file or name
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{file}.json").write_text(json.dumps(out, indent=1) + "\n")
    try:
        plot.render(name, out, arrays, results / f"{file}.png")
    except Exception:  # a plot must never cost the figures
        traceback.print_exc(file=sys.stderr)
