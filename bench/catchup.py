"""catchup: viewers re-attach from seq 0 to one 10,000-chunk stream, live and finished.

The stream is produced unpaced and the upstream holds the response open after the last
chunk (live case); then it is released and ends with ``done`` (finished case). For each case:
one viewer CATCHUP_REPS times, then 100 at once, then 1,000 at once (CATCHUP_READERS).

Before the cases, CATCHUP_WARMUP viewers catch up at once and are not counted: the load
generator's decoding runs on V8's slower tiers until it has run a few hundred viewers. Without
this, 100 live viewers right after the single ones took 166 ms (the load generator 0.21 CPU-s),
and the same 100 after the 1,000 took 127 ms (0.15 CPU-s).
"""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import numpy as np

from bench.redisd import redis_counters, redis_delta
from bench.runner import Ctx, log, relay_stack
from bench.stack import Sizing, Stack
from bench.stats import summarize
from bench.summary import BAD_CLOSES
from bench.upstream_stream import plan_message

WHAT = {
    "live": "ms from starting the connect to the last chunk; the stream is still running",
    "finished": "ms from starting the connect to the done event; the stream has ended",
}


async def run(ctx: Ctx) -> dict[str, np.ndarray]:
    """Fill one stream, then time viewers catching up with it, live and finished."""
    k = ctx.knobs
    counts = k.catchup_counts()
    ctx.out["config"] = {
        "chunks": k.catchup_chunks, "chunk_chars": k.chunk_chars, "readers": counts,
        "single_reader_reps": k.catchup_reps, "read_timeout_s": k.catchup_read_timeout_s,
        "warmup_viewers": k.catchup_warmup,
        "loadgen_procs": k.loadgens(max(counts)),
    }  # fmt: skip
    res = ctx.out["results"]
    arrays: dict[str, np.ndarray] = {}
    async with relay_stack(ctx, Sizing(16, max(counts), k.loadgens(max(counts)))) as stack:
        assert stack.api is not None and stack.upstream is not None
        sid, expect = await fill(stack, k.catchup_chunks, res)
        if k.catchup_warmup > 0:
            log(f"catchup: warm-up, {k.catchup_warmup} viewers (not counted)")
            warm, _ = await one_case(stack, sid, "live", k.catchup_warmup, 1, expect,
                                     k.catchup_read_timeout_s)  # fmt: skip
            res["warmup"] = {"viewers": k.catchup_warmup, "completed": warm["completed"],
                             "all_exact": warm["all_exact"]}  # fmt: skip
        for mode in ("live", "finished"):
            if mode == "finished":
                await stack.upstream.release()
                await stack.api.wait_settled(sid, 120, ("done", "failed", "cancelled"))
            res[mode] = {
                "what": WHAT[mode],
                "status_before": (await stack.api.stream(sid))["status"],
            }
            for count in counts:
                reps = k.catchup_reps if count == 1 else 1
                log(f"catchup: {mode}, {count} viewer(s) x {reps}")
                case, ms = await one_case(stack, sid, mode, count, reps, expect,
                                          k.catchup_read_timeout_s)  # fmt: skip
                res[mode][str(count)] = case
                arrays[f"{mode} {count}"] = ms
            # The live case holds only while the stream is still running at its end.
            res[mode]["status_after"] = (await stack.api.stream(sid))["status"]
        noise = [c["other_processes_cpu_pct"] for m in ("live", "finished")
                 for c in res[m].values() if isinstance(c, dict)]  # fmt: skip
        res["other_processes_cpu_pct"] = max(noise, default=None)
    return arrays


async def fill(stack: Stack, chunks: int, res: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Produce the stream and wait until relay's log holds all of it; return what to expect."""
    assert stack.api is not None and stack.upstream is not None
    sid = (await stack.api.post_chats([plan_message(0, chunks, 0, 0, True, False)]))[0]
    await stack.upstream.wait_for("written", 1, timeout=600)
    last_seq = (await stack.api.wait_settled(sid, timeout=600))["lastSeq"]
    up = (await stack.upstream.stats())["streams"]["0"]
    write_ms = round((up["last_us"] - up["first_us"]) / 1000, 3)
    res["fill"] = {"stream_id": sid, "chunks": up["produced"], "chars": up["chars"],
                   "last_seq": last_seq, "upstream_write_ms": write_ms}  # fmt: skip
    return sid, {"expect_chars": up["chars"], "expect_sha": up["sha256"]}


async def one_case(
    stack: Stack, sid: str, mode: str, count: int, reps: int, expect: dict[str, Any],
    timeout_s: float,
) -> tuple[dict[str, Any], np.ndarray]:  # fmt: skip
    """Run ``count`` viewers at once (``reps`` times), spread over the load generators."""
    assert stack.api is not None and stack.meter is not None
    gens = stack.loadgens[: max(1, min(count, len(stack.loadgens)))]
    shares = [count // len(gens) + (i < count % len(gens)) for i in range(len(gens))]
    url = f"{stack.api.ws_base}/api/v1/streams/{sid}/ws?after=0&batch=1"
    args = {"url": url, "token": stack.api.token, "reps": reps, "mode": mode,
            "timeout_s": timeout_s, **expect}  # fmt: skip
    before = await redis_counters(stack.redis_url)
    stack.meter.start()
    replies = await asyncio.gather(*(
        g.call("catchup", args={**args, "k": n}, timeout=reps * (timeout_s + 30) + 60)
        for g, n in zip(gens, shares, strict=True)
    ))  # fmt: skip
    meter = stack.meter.stop()
    redis = redis_delta(before, await redis_counters(stack.redis_url), None, None)
    runs = [run for r in replies for run in r["runs"]]
    viewers = [v for run in runs for v in run["viewers"]]
    ms = np.asarray([v["ms"] for v in viewers if "ms" in v], dtype=float)
    return describe(count, reps, runs, viewers, ms, meter, redis), ms


def describe(
    count: int, reps: int, runs: list[dict[str, Any]], viewers: list[dict[str, Any]],
    ms: np.ndarray, meter: dict[str, Any], redis: dict[str, Any],
) -> dict[str, Any]:  # fmt: skip
    """Summarize one case: times, exactness, close codes, CPU."""
    codes = collections.Counter(str(v["close_code"]) for v in viewers)
    errors = [v["error"] for v in viewers if v["error"]]
    case: dict[str, Any] = {
        "viewers": count, "reps": reps, "ms": summarize(ms), "completed": len(ms),
        "exact": sum(1 for v in viewers if v["exact"]),
        "all_exact": all(v["exact"] for v in viewers),
        "errors": len(errors), "error_samples": errors[:3], "close_codes": dict(codes),
        "bad_closes": sum(codes.get(c, 0) for c in BAD_CLOSES),
        "messages_per_viewer": summarize([v["msgs"] for v in viewers]),
        "connect_ms": summarize([v["connect_ms"] for v in viewers if "connect_ms" in v]),
        "wall_ms": max(run["wall_ms"] for run in runs),
        "processes": {n: {"cpu_s": p["cpu_s"], "peak_rss_mb": p["peak_rss_mb"]}
                      for n, p in meter["procs"].items()},
        "redis": {"cpu_s": redis["cpu_s"], "commands_total": redis["commands_total"]},
        "other_processes_cpu_pct": meter["others_cpu_pct"],
    }  # fmt: skip
    if count == 1:
        case["runs"] = [
            {key: v.get(key) for key in ("ms", "connect_ms", "first_ms", "msgs", "exact",
                                         "close_code", "error")}
            for v in viewers
        ]  # fmt: skip
    return case
