"""The peer (Vercel resumable-stream, ../shared/peers/resumable-stream/workloads.mjs) on the
same workload, Redis and knobs, and relay/peer ratios."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

from bench.config import Knobs
from bench.procs import npm_ci, spawn
from bench.stats import r3, ratio

PEER_NAME = {"latency": "latency", "fanout": "fanout", "catchup": "catchup",
             "throughput": "throughput", "throughput10": "throughput"}  # fmt: skip
IMPOSSIBLE = {
    "idle": "resumeExistingStream on a stream the producer has not created yet returns "
    "undefined, so nobody can wait for a stream that has not started (RESULTS.md)",
    "dispatch": "the library has no request-to-worker path: the stream is created inside the "
    "request that produces it (RESULTS.md)",
}
FINISHED_CATCHUP = (
    "impossible: once the source closes the library drops its buffer and a resumer gets null "
    "(RESULTS.md, 'Catch-up on a finished stream is impossible')"
)


def peer_env(name: str, k: Knobs, redis_url: str) -> dict[str, str]:
    """Return the peer's environment: the same Redis and the same knobs as relay's run."""
    many = [c for c in k.catchup_counts() if c > 1]
    knobs = {
        "REDIS_URL": redis_url, "S": k.s, "R": k.r, "D": k.d, "V": k.v, "FANOUT_R": k.fanout_rate,
        "CATCHUP_CHUNKS": k.catchup_chunks, "CATCHUP_READERS": many[0] if many else 100,
        "CATCHUP_REPS": k.catchup_reps, "TP_STREAMS": k.tp_streams, "TP_CHUNKS": k.tp_chunks,
        "TP_READERS": k.tp10_readers if name == "throughput10" else k.tp_readers,
        "STAGGER": k.stagger, "CHUNK_CHARS": k.chunk_chars, "TIMEOUT_S": k.timeout(name),
    }  # fmt: skip
    if k.loadgen_procs:
        # relay's viewers over that many load generators: the peer's readers over as many
        # processes (its default, like relay's below VIEWERS_PER_PROC viewers, is one).
        knobs["READER_PROCS"] = k.loadgen_procs
    return {**os.environ, **{key: f"{v:g}" if isinstance(v, float) else str(v)
                             for key, v in knobs.items()}}  # fmt: skip


async def _why_not(name: str, k: Knobs, logdir: Path) -> str | None:
    if not k.bench_peer:
        return "BENCH_PEER=0"
    if name not in PEER_NAME:
        return "relay's own micro-benchmarks: no peer counterpart"
    if shutil.which("node") is None:
        return "node is not installed"
    if not (k.peer_path / "workloads.mjs").exists():
        return f"no workloads.mjs in {k.peer_path}"
    if not (k.peer_path / "node_modules").exists():
        return await npm_ci(k.peer_path, logdir)
    return None


async def run(name: str, k: Knobs, redis_url: str, logdir: Path) -> dict[str, Any]:
    """Run ``node workloads.mjs <workload>`` on relay's Redis; return its result or why not."""
    if name in IMPOSSIBLE:
        return {"impossible": IMPOSSIBLE[name]}
    why = await _why_not(name, k, logdir)
    if why is not None:
        return {"skipped": why}
    node = shutil.which("node")
    assert node is not None
    child = await spawn(f"peer-{name}", [node, "workloads.mjs", PEER_NAME[name]],
                        env=peer_env(name, k, redis_url), cwd=k.peer_path, logdir=logdir,
                        pipes=True)  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(child.proc.communicate(), k.timeout(name) + 120)
    except TimeoutError:
        return {"skipped": f"peer exceeded {k.timeout(name) + 120:g} s", "log": child.tail()}
    finally:
        await child.stop(timeout=5)
    lines = [json.loads(x) for x in out.decode().splitlines() if x.startswith("{")]
    if not lines:
        return {"skipped": f"the peer printed no result (exit {child.proc.returncode})",
                "log": child.tail()}  # fmt: skip
    raw = lines[-1]
    return {"summary": summarize(name, raw), "raw": raw}


def summarize(name: str, raw: dict[str, Any]) -> dict[str, Any]:
    """Return the peer's headline figures in relay's terms."""
    res = raw.get("results", {})
    if name == "catchup":
        return {
            "single_ms": res.get("single_reader", {}).get("last_byte_ms"),
            "concurrent_readers": res.get("concurrent_readers", {}).get("readers"),
            "concurrent_ms": res.get("concurrent_readers", {}).get("last_byte_ms"),
            "concurrent_all_exact": res.get("concurrent_readers", {}).get("all_exact"),
            "finished": FINISHED_CATCHUP,
        }
    cpu = (res.get("producer", {}).get("cpu_s") or 0) + (res.get("redis", {}).get("cpu_s") or 0)
    cpu += sum(p.get("cpu_s") or 0 for p in res.get("reader_procs", []))
    got = res.get("chunks_received") or 0
    return {
        "latency_ms": res.get("latency_ms"), "chunks_per_s": res.get("end_to_end_chunks_per_s"),
        "cpu_s": r3(cpu), "cpu_us_per_delivery": r3(cpu * 1e6 / got) if got else None,
        "deliveries_per_cpu_s": round(got / cpu, 1) if cpu else None,
        "lost": res.get("lost"), "duplicated": res.get("duplicated"),
        "every_reader_got_every_chunk": res.get("every_reader_got_every_chunk"),
        "timed_out": res.get("timed_out", False),
    }  # fmt: skip


def ratios(name: str, out: dict[str, Any]) -> dict[str, Any]:
    """Return relay/peer for the headline figures (below 1 means relay is lower)."""
    peer = out.get("peer", {}).get("summary")
    res = out.get("results", {})
    if not peer:
        return {}
    if name == "catchup":
        n = str(peer.get("concurrent_readers"))
        live = res.get("live", {})
        return {
            "single_p50": ratio(_get(live, "1", "ms", "p50"), _get(peer, "single_ms", "p50")),
            f"concurrent{n}_p99": ratio(_get(live, n, "ms", "p99"),
                                        _get(peer, "concurrent_ms", "p99")),
        }  # fmt: skip
    return {
        "p50": ratio(_get(res, "latency_ms", "p50"), _get(peer, "latency_ms", "p50")),
        "p99": ratio(_get(res, "latency_ms", "p99"), _get(peer, "latency_ms", "p99")),
        "chunks_per_s": ratio(res.get("end_to_end_chunks_per_s"), peer.get("chunks_per_s")),
        "cpu_per_chunk": ratio(res.get("relay_cpu_us_per_delivery"), peer["cpu_us_per_delivery"]),
    }


def _get(d: dict[str, Any], *path: str) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)  # type: ignore[assignment]
    return d
