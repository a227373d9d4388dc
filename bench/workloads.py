"""The workloads by name: their sizes (from the knobs) and the runner each uses.

``log``, ``sweep`` and ``clientfloor`` (not in the default suite) run bench/log.py (the chunk
log's micro-benchmarks), bench/sweep.py (one sweeper pass over 5,000 active streams) and
bench/clientfloor.py (what a client pays to read one catch-up, without relay) under
BENCH_RELAY_ROOT's interpreter with that checkout as working directory, so that its
``models`` are the ones under test.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np

from bench import catchup, dispatch, idle
from bench.config import BENCH_DIR, Knobs
from bench.live import LiveSpec, run_live
from bench.procs import die_with_parent
from bench.runner import Ctx, Workload, relay_stack
from bench.stack import Sizing


def live_spec(name: str, k: Knobs) -> LiveSpec:
    """Return the sizes of a live workload from the knobs."""
    if name == "latency":
        return LiveSpec(k.s, 1, round(k.r * k.d), k.r, bool(k.stagger))
    if name == "fanout":
        return LiveSpec(1, k.v, round(k.fanout_rate * k.d), k.fanout_rate, bool(k.stagger))
    readers = k.tp_readers if name == "throughput" else k.tp10_readers
    return LiveSpec(k.tp_streams, readers, k.tp_chunks, 0.0, False)


def live(name: str) -> Workload:
    """Return the runner of a live workload (latency, fanout, throughput, throughput10)."""

    async def run(ctx: Ctx) -> dict[str, np.ndarray]:
        spec = live_spec(name, ctx.knobs)
        viewers = spec.streams * spec.per_stream
        ctx.out["config"] = {
            "streams": spec.streams, "viewers_per_stream": spec.per_stream, "viewers": viewers,
            "chunks_per_stream": spec.n, "rate_per_stream": spec.rate or "unpaced",
            "duration_s": ctx.knobs.d if spec.rate else None, "stagger": spec.stagger,
            "chunk_chars": ctx.knobs.chunk_chars, "attach_conc": ctx.knobs.attach_conc,
            "loadgen_procs": ctx.knobs.loadgens(viewers),
            "worker_concurrency": max(16, spec.streams),
        }  # fmt: skip
        sizing = Sizing(max(16, spec.streams), viewers, ctx.knobs.loadgens(viewers))
        async with relay_stack(ctx, sizing) as stack:
            return await run_live(stack, spec, ctx.knobs, ctx.out, ctx.deadline)

    return run


def micro(script: str) -> Workload:
    """A micro-benchmark script of bench/ (log.py, sweep.py, clientfloor.py), run on the
    run's Redis."""

    async def run(ctx: Ctx) -> dict[str, np.ndarray]:
        return await run_script(ctx, script)

    return run


async def run_script(ctx: Ctx, script_name: str) -> dict[str, np.ndarray]:
    """Run a bench/ script with the interpreter and the working directory of the code under
    test; its JSON output becomes the results."""
    root = ctx.knobs.relay_root
    script = (
        "import runpy, sys; sys.argv = [sys.argv[1], sys.argv[2]]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    argv = [
        str(root / ".venv/bin/python"), "-c", script, str(BENCH_DIR / script_name), ctx.redis_url,
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=root, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        preexec_fn=die_with_parent,
    )  # fmt: skip
    try:
        out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()  # our own child, by its pid
            await proc.wait()
    if proc.returncode:
        raise RuntimeError(f"bench/{script_name} failed: {err.decode()[-1500:]}")
    ctx.out["config"] = {"script": f"bench/{script_name}", "cwd": str(root)}
    ctx.out["results"].update(json.loads(out))
    return {}


REGISTRY: dict[str, Workload] = {
    "latency": live("latency"),
    "fanout": live("fanout"),
    "catchup": catchup.run,
    "throughput": live("throughput"),
    "throughput10": live("throughput10"),
    "idle": idle.run,
    "dispatch": dispatch.run,
    "log": micro("log.py"),
    "sweep": micro("sweep.py"),
    "clientfloor": micro("clientfloor.py"),
}
