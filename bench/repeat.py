"""``BENCH_REPEAT=n``: each workload run n times in a row (relay, then the peer, each time),
and the median of every headline figure across the runs.

On two shared cores one run's p99 moves by a third from run to run (the latency workload's
relay p99 was 4.2 to 8.0 ms in one afternoon's runs of the same code), more than most
changes move it. Relay and the peer measured back to back share the conditions of the
moment, so the median of the per-run ratios is the steadiest comparison; the medians of the
figures themselves are given too. Each run keeps its own file (``<name>.<i>.json``);
``<name>.json`` is the run whose relay headline is the median one, with the summary under
``repeats``.
"""

from __future__ import annotations

import statistics
from typing import Any

from bench.peer import _get

Figures = dict[str, float | None]


def figures(name: str, out: dict[str, Any]) -> Figures:
    """The headline numbers of one run: relay's (``relay …``) and the peer's (``peer …``)."""
    r, p = out.get("results", {}), out.get("peer", {}).get("summary") or {}
    if name == "catchup":
        found: Figures = {}
        for mode in ("live", "finished"):
            for count, case in r.get(mode, {}).items():
                if isinstance(case, dict) and "ms" in case:
                    pk = "p50" if count == "1" else "p99"
                    found[f"relay {mode} {count} {pk}"] = case["ms"].get(pk)
        found["peer live 1 p50"] = _get(p, "single_ms", "p50")
        found[f"peer live {p.get('concurrent_readers')} p99"] = _get(p, "concurrent_ms", "p99")
        return found
    if name == "idle":
        idle = r.get("idle", {})
        return {
            "relay web RSS per viewer KB": idle.get("web_rss_per_viewer_kb"),
            "relay web CPU % while waiting": idle.get("web_cpu_pct_of_core_while_waiting"),
            "relay first chunk p50": _get(r, "first_chunk_latency_ms", "p50"),
            "relay first chunk p99": _get(r, "first_chunk_latency_ms", "p99"),
        }
    if name == "dispatch":
        adjusted = r.get("adjusted_ms", {})
        streamed = r.get("streamed", {}).get("adjusted_ms", {})
        return {"relay p50": adjusted.get("p50"), "relay p99": adjusted.get("p99"),
                "relay streamed p50": streamed.get("p50"),
                "relay streamed p99": streamed.get("p99")}  # fmt: skip
    return {
        "relay p50": _get(r, "latency_ms", "p50"),
        "relay p99": _get(r, "latency_ms", "p99"),
        "peer p50": _get(p, "latency_ms", "p50"),
        "peer p99": _get(p, "latency_ms", "p99"),
        "relay deliveries per CPU-s": r.get("deliveries_per_relay_cpu_s"),
        "peer deliveries per CPU-s": p.get("deliveries_per_cpu_s"),
    }


def _median(values: list[Any]) -> float | None:
    present = [v for v in values if isinstance(v, int | float)]
    return round(statistics.median(present), 3) if present else None


def summarize(name: str, outs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every run's figures and ratios, and the median of each across the runs."""
    each = [figures(name, o) for o in outs]
    ratios = [o.get("ratios") or {} for o in outs]
    keys = list(dict.fromkeys(k for f in each for k in f))
    ratio_keys = list(dict.fromkeys(k for r in ratios for k in r))
    return {
        "runs": len(outs),
        "figures": {k: [f.get(k) for f in each] for k in keys},
        "median": {k: _median([f.get(k) for f in each]) for k in keys},
        "ratios": {k: [r.get(k) for r in ratios] for k in ratio_keys},
        "median_ratios": {k: _median([r.get(k) for r in ratios]) for k in ratio_keys},
    }


def median_run(name: str, outs: list[dict[str, Any]]) -> int:
    """The index of the run whose relay headline (its p99, or the first relay figure) is
    the median one (the lower middle for an even count)."""

    def headline(o: dict[str, Any]) -> float:
        f = figures(name, o)
        key = "relay p99" if "relay p99" in f else next((k for k in f if k.startswith("relay")), "")
        value = f.get(key)
        return float(value) if isinstance(value, int | float) else float("inf")

    order = sorted(range(len(outs)), key=lambda i: headline(outs[i]))
    return order[(len(order) - 1) // 2]
