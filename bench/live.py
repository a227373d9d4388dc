"""Live workloads: streams gated at the upstream, viewers attached first, then "go".

latency, fanout, throughput (and throughput10) are this with different sizes; idle adds its
own measurements between the steps.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from bench import summary
from bench.config import Knobs
from bench.redisd import redis_counters, redis_delta
from bench.runner import log
from bench.stack import Stack
from bench.upstream_stream import plan_message


@dataclass(frozen=True)
class LiveSpec:
    """Sizes of a live workload."""

    streams: int
    per_stream: int  # viewers of each stream
    n: int  # chunks per stream
    rate: float  # chunks/s per stream; 0 is unpaced
    stagger: bool

    def messages(self) -> list[str]:
        """Return the user message of every stream (its plan for the upstream)."""
        period_ms = 1000 / self.rate if self.rate > 0 else 0
        return [
            plan_message(s, self.n, self.rate,
                         s / self.streams * period_ms if self.stagger else 0, False, True)
            for s in range(self.streams)
        ]  # fmt: skip

    def expected_s(self) -> float:
        """Return how long the streams should take to produce."""
        return self.n / self.rate if self.rate > 0 else 60.0


async def prepare(stack: Stack, spec: LiveSpec, out: dict[str, Any]) -> list[str]:
    """Post every chat and wait until the worker has called the upstream for each."""
    assert stack.api is not None and stack.upstream is not None
    t0 = time.monotonic()
    sids = await stack.api.post_chats(spec.messages())
    await stack.upstream.wait_for("arrived", spec.streams, timeout=120)
    out["post_and_dispatch_s"] = round(time.monotonic() - t0, 3)
    return sids


async def attach(stack: Stack, spec: LiveSpec, sids: list[str], knobs: Knobs) -> dict[str, Any]:
    """Open every viewer (round-robin over the load generators); return the attach figures."""
    assert stack.api is not None
    lists: list[list[list[Any]]] = [[] for _ in stack.loadgens]
    j = 0
    for s, sid in enumerate(sids):
        for _ in range(spec.per_stream):
            lists[j % len(lists)].append([sid, s, spec.n])
            j += 1
    replies = await asyncio.gather(*(
        lg.call("attach", url=stack.api.ws_base, token=stack.api.token, viewers=v,
                conc=knobs.attach_conc)
        for lg, v in zip(stack.loadgens, lists, strict=True)
    ))  # fmt: skip
    return {
        "wall_ms": max(r["attach_wall_ms"] for r in replies),
        "opened": sum(r["opened"] for r in replies),
        "errors": sum(r["errors"] for r in replies),
        "error_samples": [e for r in replies for e in r["error_samples"]][:3],
    }


async def run_and_measure(
    stack: Stack, spec: LiveSpec, out: dict[str, Any], deadline: float
) -> tuple[np.ndarray, np.ndarray]:
    """Say go, wait for every viewer to close, and fill ``out`` with the figures."""
    assert stack.upstream is not None and stack.meter is not None
    res = out["results"]
    before = await redis_counters(stack.redis_url)
    stack.meter.start()
    go_us = await stack.upstream.go()
    log(f"go: streams run (monotonic {go_us} us; for a profiler to time its window)")
    wait_s = max(5.0, deadline - time.monotonic() - 30)
    reports = await asyncio.gather(*(
        lg.call("wait_closed", timeout_s=wait_s, timeout=wait_s + 60) for lg in stack.loadgens
    ))  # fmt: skip
    meter = stack.meter.stop()
    after = await redis_counters(stack.redis_url)
    up = await stack.upstream.stats()
    merged = summary.merge_reports(list(reports))
    res.update(summary.delivery(merged, up, spec.per_stream))
    res["timed_out"] = merged["closed"] < merged["viewers"]
    lat, first = summary.load_latencies(reports), summary.load_latencies(reports, "first_file")
    summary.latency(res, lat, first)
    summary.throughput(res, go_us, merged["last_recv_us"], spec.rate, spec.streams)
    res["producer_pacing_lag_ms"] = up["pacing_lag_ms"]
    redis = redis_delta(before, after, up["produced"], res["chunks_received"])
    summary.cpu(res, meter, redis)
    return lat, first


async def run_live(
    stack: Stack, spec: LiveSpec, knobs: Knobs, out: dict[str, Any], deadline: float
) -> dict[str, np.ndarray]:
    """The whole live workload: post, attach before go, run, measure."""
    sids = await prepare(stack, spec, out["results"])
    out["results"]["attach"] = await attach(stack, spec, sids, knobs)
    await asyncio.sleep(knobs.attach_settle_s)  # let the server finish subscribing them
    lat, _first = await run_and_measure(stack, spec, out, deadline)
    return {"latency": lat}
