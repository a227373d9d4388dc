"""idle: IDLE_VIEWERS viewers attached to streams that have not started yet.

IDLE_STREAMS streams (1,000 by default, so 10 viewers each) are claimed by the worker, whose
upstream requests wait for "go" before their first delta. Measured: the web process's RSS
growth per viewer, its CPU while the viewers wait (IDLE_WAIT_S), then, after go, how fast the
first chunk of each stream reaches its viewers (IDLE_CHUNKS chunks at IDLE_RATE per stream,
first chunks spread evenly over one period).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from bench.live import LiveSpec, attach, prepare, run_and_measure
from bench.redisd import redis_counters, redis_delta
from bench.runner import Ctx, log, relay_stack
from bench.stack import Sizing, Stack
from bench.stats import r3


async def run(ctx: Ctx) -> dict[str, np.ndarray]:
    """Attach the idle viewers, measure them waiting, then start the streams."""
    k = ctx.knobs
    streams = max(1, min(k.idle_streams, k.idle_viewers))
    spec = LiveSpec(streams, max(1, k.idle_viewers // streams), k.idle_chunks, k.idle_rate, True)
    viewers = spec.streams * spec.per_stream
    ctx.out["config"] = {
        "viewers": viewers, "streams": streams, "viewers_per_stream": spec.per_stream,
        "wait_s": k.idle_wait_s, "chunks_per_stream": spec.n, "rate_per_stream": spec.rate,
        "stagger": True, "loadgen_procs": k.loadgens(viewers), "worker_concurrency": streams,
    }  # fmt: skip
    res = ctx.out["results"]
    async with relay_stack(ctx, Sizing(max(16, streams), viewers, k.loadgens(viewers))) as stack:
        sids = await prepare(stack, spec, res)
        res["idle"] = await wait_idle(stack, spec, sids, ctx)
        log(f"idle: {viewers} viewers waited {k.idle_wait_s:g} s; go")
        lat, first = await run_and_measure(stack, spec, ctx.out, ctx.deadline)
    return {"first chunk": first, "every chunk": lat}


async def wait_idle(stack: Stack, spec: LiveSpec, sids: list[str], ctx: Ctx) -> dict[str, Any]:
    """Attach every viewer, then measure memory per viewer and CPU while they wait."""
    assert stack.meter is not None
    k = ctx.knobs
    await asyncio.sleep(2)  # the worker's claims and the web's first requests settle first
    stack.meter.start()
    rss0 = stack.meter.rss("web_worker")
    ctx.out["results"]["attach"] = await attach(stack, spec, sids, k)
    await asyncio.sleep(k.attach_settle_s + 2)
    rss1 = stack.meter.rss("web_worker")
    attach_meter = stack.meter.stop()
    before = await redis_counters(stack.redis_url)
    stack.meter.start()
    log(f"idle: waiting {k.idle_wait_s:g} s (for a profiler to time its window)")
    await asyncio.sleep(k.idle_wait_s)
    waiting = stack.meter.stop()
    redis = redis_delta(before, await redis_counters(stack.redis_url), None, None)
    viewers = spec.streams * spec.per_stream
    web = waiting["procs"]["web_worker"]
    redis["commands_per_s"] = r3(redis["commands_total"] / waiting["span_s"])
    return {
        "web_rss_before_mb": r3(rss0 / 2**20),
        "web_rss_after_mb": r3(rss1 / 2**20),
        "web_rss_per_viewer_kb": r3((rss1 - rss0) / viewers / 1024),
        "web_cpu_pct_of_core_while_waiting": web["cpu_pct"],
        "wait_s": waiting["span_s"],
        "processes_while_waiting": waiting["procs"],
        "redis_while_waiting": redis,
        "processes_while_attaching": attach_meter["procs"],
    }
