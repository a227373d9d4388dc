"""``python -m bench.ab <baseline root> [workload ...]``: this checkout against another one,
run by run, relay alone (the peer is not run).

On the shared VMs these figures come from, every step of a workload moves together from one
run to the next: ten runs of ``dispatch`` on the same code in one afternoon had p50s from 6.6
to 11 ms, and the steps a change does not touch moved with the ones it does. That is more
than most changes move, so one run of each version says little, and runs of one version
after the other's compare two spells of the machine. Here the two versions alternate:
``AB_ROUNDS`` rounds (default 5), each one run of the baseline (A) and one of this checkout
(B), in the order A B, then B A, and so on (a drift within a round cancels over two). What
is compared is each round's difference, B minus A, per figure: the figures of every run,
the differences, their median, and in how many rounds B was lower. Beside them, the CPU seconds
of the harness's own processes (the upstream and the load generators), whose work is the
same in both arms: a round where they differ ran the two arms in different spells of the
machine (on these VMs every process, the harness's too, can use a fifth more CPU for the
same work from one run to the next).

The baseline is another checkout with its own ``.venv``, as for ``BENCH_RELAY_ROOT``
(docs/performance.md, "Measuring another version of relay"). Every knob applies to both.
One JSON object on stdout; every run's own result under ``BENCH_RESULTS_DIR`` (default
bench/results/ab/) as ``a/<name>.<round>.json`` and ``b/<name>.<round>.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import repeat
from bench.config import EXTRA_WORKLOADS, WORKLOADS, Knobs
from bench.runner import log, run_workload
from bench.workloads import REGISTRY

USAGE = f"usage: python -m bench.ab <baseline root> [{' | '.join(WORKLOADS + EXTRA_WORKLOADS)} ...]"
Figures = dict[str, float | None]


def figures(name: str, out: dict[str, Any]) -> Figures:
    """Relay's headline figures of one run (bench/repeat.py), with relay's CPU seconds,
    for ``dispatch`` the median of each step of the way, and the harness's CPU seconds."""
    found = {k: v for k, v in repeat.figures(name, out).items() if k.startswith("relay")}
    results = out.get("results", {})
    if isinstance(results.get("relay_cpu_s"), int | float):
        found["relay CPU-s"] = results["relay_cpu_s"]
    harness = harness_cpu_s(results.get("processes"))
    if harness is not None:
        found[HARNESS] = harness
        relay_cpu = found.get("relay CPU-s")
        if relay_cpu is not None and harness > 0:
            found[RELATIVE] = round(relay_cpu / harness, 4)
    streamed = results.get("streamed", {}).get("breakdown_ms")
    for where, steps in (("", results.get("breakdown_ms")), ("streamed ", streamed)):
        for step, value in (steps or {}).items():
            p50 = value.get("p50") if isinstance(value, dict) else value
            if isinstance(p50, int | float):
                found[f"relay {where}{step.removesuffix('_ms').replace('_', ' ')} p50"] = p50
    return found


# The upstream's and the load generators' CPU seconds: their work is the same in both arms, so
# a round where B's is well above A's (or below) ran in a slower (or faster) spell of the
# machine, and its other differences say as much about the machine as about the change.
HARNESS = "harness CPU-s (same work in both arms)"
# relay's CPU seconds per CPU second of the harness: a change in relay's CPU for the same work
# shows here even when a spell of the machine moves both (fanout, 2026-12-04: relay's CPU-s
# 1.94-3.21 and the harness's 2.81-4.03 over eight runs; this ratio 0.67-0.80).
RELATIVE = "relay CPU-s per harness CPU-s"


def harness_cpu_s(processes: Any) -> float | None:
    if not isinstance(processes, dict):
        return None
    harness = [p for name, p in processes.items() if name.startswith(("upstream", "loadgen"))]
    cpu = [p.get("cpu_s") for p in harness if isinstance(p, dict)]
    numbers = [c for c in cpu if isinstance(c, int | float)]
    return round(sum(numbers), 3) if numbers else None


def compare(a_runs: list[Figures], b_runs: list[Figures]) -> dict[str, Any]:
    """Per figure: every run's value, the rounds' differences (B - A), their median, and how
    many rounds had B lower."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for f in [*a_runs, *b_runs] for k in f):
        a = [f.get(key) for f in a_runs]
        b = [f.get(key) for f in b_runs]
        diffs = [round(y - x, 3) for x, y in zip(a, b, strict=True)
                 if isinstance(x, int | float) and isinstance(y, int | float)]  # fmt: skip
        out[key] = {
            "a": a,
            "b": b,
            "b_minus_a": diffs,
            "median_b_minus_a": round(statistics.median(diffs), 3) if diffs else None,
            "rounds_b_lower": f"{sum(d < 0 for d in diffs)}/{len(diffs)}",
        }
    return out


async def run_ab(baseline: Path, names: list[str], knobs: Knobs, rounds: int) -> int:
    """Run every workload ``rounds`` times on each version, alternately; print the comparison."""
    results = knobs.results_dir if knobs.bench_results_dir else knobs.results_dir / "ab"
    arms = {
        "a": replace(knobs, bench_peer=0, bench_relay_root=str(baseline),
                     bench_results_dir=str(results / "a")),
        "b": replace(knobs, bench_peer=0, bench_relay_root=str(knobs.relay_root),
                     bench_results_dir=str(results / "b")),
    }  # fmt: skip
    failed = 0
    for name in names:
        runs: dict[str, list[Figures]] = {"a": [], "b": []}
        commits: dict[str, str] = {}
        for i in range(rounds):
            for arm in ("a", "b") if i % 2 == 0 else ("b", "a"):
                arms[arm].results_dir.mkdir(parents=True, exist_ok=True)
                out = await run_workload(name, REGISTRY[name], arms[arm], f"{name}.{i + 1}")
                res = out["results"]
                failed += bool(res.get("error") or res.get("timed_out"))
                runs[arm].append(figures(name, out))
                commits[arm] = out["relay"]["commit"]
        summary = {
            "workload": name,
            "ab": {"rounds": rounds, "a": {"root": str(baseline), "commit": commits["a"]},
                   "b": {"root": str(knobs.relay_root), "commit": commits["b"]}},
            "figures": compare(runs["a"], runs["b"]),
        }  # fmt: skip
        print(json.dumps(summary), flush=True)
        medians = {k: v["median_b_minus_a"] for k, v in summary["figures"].items()}
        log(f"{name}: B - A medians over {rounds} rounds {medians}")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + (__doc__ or ""), file=sys.stderr)
        return 0 if argv else 2
    baseline = Path(argv[0]).resolve()
    if not (baseline / ".venv" / "bin" / "python").exists():
        print(f"{baseline} has no .venv: run make install there\n{USAGE}", file=sys.stderr)
        return 2
    names = argv[1:] or list(WORKLOADS)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        print(f"unknown workload(s): {', '.join(unknown)}\n{USAGE}", file=sys.stderr)
        return 2
    rounds = int(os.environ.get("AB_ROUNDS", "5"))
    return asyncio.run(run_ab(baseline, names, Knobs.from_env(), rounds))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
