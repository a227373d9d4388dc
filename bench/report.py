"""Markdown side-by-side table from bench/results/*.json (``python -m bench.report [dir]``).

Columns: workload | figure | peer | relay | relay/peer. A workload without a result file is
left out; the peer's column says "impossible" or "skipped" where it did not run.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.config import BENCH_DIR
from bench.peer import FINISHED_CATCHUP, _get

Row = tuple[str, str, str, str]  # figure, peer, relay, relay/peer
X = "\N{MULTIPLICATION SIGN}"  # as in the tables


def ms(x: float | None) -> str:
    """Format milliseconds: 0.45 ms, 68 ms, 11.2 s."""
    if x is None:
        return "—"
    if x >= 1000:
        return f"{x / 1000:.3g} s"
    return f"{x:.3g} ms" if x >= 1 else f"{x:.2f} ms"


def num(x: float | None) -> str:
    """Format a count with thousands separators, small values with 3 digits."""
    return "—" if x is None else f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def times(a: float | None, b: float | None) -> str:
    """Return a/b as a factor, or a dash when either is missing."""
    if a is None or b is None or b == 0:
        return "—"
    r = a / b
    return f"{X}{r:,.0f}" if r >= 100 else f"{X}{r:.3g}"


def pair(a: str, b: str) -> str:
    """Join two formatted values as "a / b"."""
    return f"{a} / {b}"


def live_rows(out: dict[str, Any]) -> list[Row]:
    """Latency, fan-out and throughput: percentiles, rates, CPU."""
    r, p = out["results"], out.get("peer", {}).get("summary") or {}
    lat, plat = r.get("latency_ms", {}), p.get("latency_ms") or {}
    one_each = out.get("config", {}).get("viewers_per_stream") == 1
    req = r.get("requested_chunks_per_s") if one_each else None
    rate = num(r.get("end_to_end_chunks_per_s")) + (f" ({num(req)} requested)" if req else "")
    return [
        ("producer → viewer p50 / p99", pair(ms(plat.get("p50")), ms(plat.get("p99"))),
         pair(ms(lat.get("p50")), ms(lat.get("p99"))),
         pair(times(lat.get("p50"), plat.get("p50")), times(lat.get("p99"), plat.get("p99")))),
        ("chunks delivered/s", num(p.get("chunks_per_s")), rate,
         times(r.get("end_to_end_chunks_per_s"), p.get("chunks_per_s"))),
        ("CPU-s (relay: web + worker + Redis; peer: all)", num(p.get("cpu_s")),
         num(r.get("relay_cpu_s")), times(r.get("relay_cpu_s"), p.get("cpu_s"))),
        ("deliveries per CPU-s of those", num(p.get("deliveries_per_cpu_s")),
         num(r.get("deliveries_per_relay_cpu_s")),
         times(r.get("deliveries_per_relay_cpu_s"), p.get("deliveries_per_cpu_s"))),
        ("lost / duplicated", pair(num(p.get("lost")), num(p.get("duplicated"))),
         pair(num(r.get("lost")), num(r.get("duplicated"))), ""),
    ]  # fmt: skip


def catchup_rows(out: dict[str, Any]) -> list[Row]:
    """One viewer p50, then each crowd's p99 and completions, live and finished."""
    r, p = out["results"], out.get("peer", {}).get("summary") or {}
    rows: list[Row] = []
    n_peer = str(p.get("concurrent_readers"))
    for mode in ("live", "finished"):
        for count, case in r.get(mode, {}).items():
            if not isinstance(case, dict) or "ms" not in case:
                continue
            pk = "p50" if count == "1" else "p99"
            peer = _peer_catchup(p, mode, count, n_peer, pk)
            done = f"; {case['completed']}/{case['viewers'] * case['reps']} complete"
            bad = f", {case['bad_closes']} {X} 1011/1013" if case.get("bad_closes") else ""
            first = case.get("runs", [{}])[0].get("ms") if count == "1" else None
            cold = f" (first run: {ms(first)})" if first is not None else ""
            relay = ms(case["ms"].get(pk)) + (done + bad if count != "1" else cold)
            who = f"1 viewer ({case['reps']} runs)" if count == "1" else f"{count} at once"
            rows.append((f"{mode}: {who}, connect → end {pk}", peer[0], relay,
                         times(case["ms"].get(pk), peer[1])))  # fmt: skip
    return rows


def _peer_catchup(p: dict[str, Any], mode: str, count: str, n: str, pk: str) -> tuple[str, Any]:
    if not p:
        return "—", None
    if mode == "finished":
        return "impossible", None
    key = "single_ms" if count == "1" else "concurrent_ms" if count == n else None
    value = _get(p, key, pk) if key else None
    return (ms(value), value) if key else ("—", None)


def idle_rows(out: dict[str, Any]) -> list[Row]:
    """Memory and CPU per waiting viewer, first chunk once streams start."""
    r = out["results"]
    idle, first = r.get("idle", {}), r.get("first_chunk_latency_ms", {})
    return [
        ("web RSS per viewer", "impossible", f"{num(idle.get('web_rss_per_viewer_kb'))} KB", ""),
        ("web CPU while waiting", "impossible",
         f"{num(idle.get('web_cpu_pct_of_core_while_waiting'))} % of a core", ""),
        ("first chunk p50 / p99 once streams start", "impossible",
         pair(ms(first.get("p50")), ms(first.get("p99"))), ""),
    ]  # fmt: skip


def dispatch_rows(out: dict[str, Any]) -> list[Row]:
    """relay's own delay before the first chunk, and its parts."""
    r = out["results"]
    adj, parts = r.get("adjusted_ms", {}), r.get("breakdown_ms", {})
    rows: list[Row] = [("POST → first chunk, minus the generator's delay, p50 / p99", "—",
                        pair(ms(adj.get("p50")), ms(adj.get("p99"))), "")]  # fmt: skip
    for name, s in parts.items():
        rows.append((f"… {name.removesuffix('_ms').replace('_', ' ')} p50", "—", ms(s["p50"]), ""))
    streamed = r.get("streamed", {}).get("adjusted_ms")
    if streamed:  # the answer on the post's own response (Accept: text/event-stream)
        rows.append(("streamed post → first chunk, minus the generator's delay, p50 / p99", "—",
                     pair(ms(streamed.get("p50")), ms(streamed.get("p99"))), ""))  # fmt: skip
    return rows


def repeat_rows(out: dict[str, Any]) -> list[Row]:
    """With BENCH_REPEAT: each relay figure's median across the runs (beside the peer's,
    where it has the same figure), and the median of the runs' relay/peer ratios."""
    rep = out.get("repeats")
    if not rep:
        return []
    n, median = rep["runs"], rep["median"]
    rows: list[Row] = []
    for key, value in median.items():
        if not key.startswith("relay "):
            continue
        label = key.removeprefix("relay ")
        fmt = ms if " p50" in key or " p99" in key else num
        peer = median.get(f"peer {label}")
        rows.append((f"median of {n} runs: {label}", fmt(peer) if peer is not None else "—",
                     fmt(value), times(value, peer)))  # fmt: skip
    ratios = ", ".join(f"{k} {X}{v:.3g}" for k, v in rep["median_ratios"].items() if v)
    if ratios:
        rows.append((f"median of the {n} runs' relay/peer", "", "", ratios))
    return rows


ROWS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "latency": live_rows, "fanout": live_rows, "catchup": catchup_rows,
    "throughput": live_rows, "throughput10": live_rows, "idle": idle_rows,
    "dispatch": dispatch_rows,
}  # fmt: skip


def describe(out: dict[str, Any]) -> str:
    """Return the workload cell: its name and size."""
    c = out.get("config", {})
    sizes = {
        "latency": f"{c.get('streams')} streams {X} {c.get('rate_per_stream')}/s, 1 viewer each",
        "fanout": f"1 stream {X} {c.get('rate_per_stream')}/s, {c.get('viewers')} viewers",
        "catchup": f"{c.get('chunks')}-chunk stream",
        "throughput": f"{c.get('streams')} streams {X} {c.get('chunks_per_stream')} unpaced, "
        f"{c.get('viewers_per_stream')} viewer(s) each",
        "idle": f"{c.get('viewers')} viewers on {c.get('streams')} streams not started",
        "dispatch": f"{c.get('chats')} chats one after another",
    }
    size = sizes.get(out["workload"].removesuffix("10"), "")
    res = out["results"]
    failed = " **(timed out)**" if res.get("timed_out") else ""
    failed += " **(error)**" if res.get("error") else ""
    noise = res.get("other_processes_cpu_pct")
    noisy = f" (other processes: {noise:.0f} % of a core)" if noise is not None else ""
    return f"{out['workload']}: {size}{failed}{noisy}"


def table(results: Path) -> str:
    """Return the markdown table for every known result file in ``results``."""
    lines = ["| workload | figure | peer | relay | relay/peer |", "|---|---|---|---|---|"]
    for name, rows in ROWS.items():
        path = results / f"{name}.json"
        if not path.exists():
            continue
        out = json.loads(path.read_text())
        for i, (figure, peer, relay, rel) in enumerate(rows(out) + repeat_rows(out)):
            cell = describe(out) if i == 0 else ""
            lines.append(f"| {cell} | {figure} | {peer} | {relay} | {rel} |")
    return "\n".join(lines)


def main() -> None:
    """Print the table for the given results directory (default bench/results)."""
    results = Path(sys.argv[1]) if len(sys.argv) > 1 else BENCH_DIR / "results"
    print(table(results))
    print(f"\nFinished-stream catch-up in the peer: {FINISHED_CATCHUP}.")


if __name__ == "__main__":
    main()
