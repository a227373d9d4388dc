"""``python -m bench [workload ...]``: run the benchmark workloads (all by default).

Each workload prints one JSON object on one line on stdout (progress goes to stderr) and
writes bench/results/<name>.json and <name>.png. Knobs: environment variables, see
bench/config.py and docs/performance.md.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench import repeat
from bench.config import EXTRA_WORKLOADS, WORKLOADS, Knobs
from bench.runner import log, run_workload
from bench.workloads import REGISTRY

USAGE = f"usage: python -m bench [{' | '.join(WORKLOADS + EXTRA_WORKLOADS)} ...]"


async def run_all(names: list[str], knobs: Knobs) -> int:
    """Run each workload in turn; a failed or timed-out one does not stop the next."""
    failed = 0
    t0 = time.monotonic()
    for name in names:
        outs = []
        for i in range(max(1, knobs.bench_repeat)):
            file = f"{name}.{i + 1}" if knobs.bench_repeat > 1 else None
            out = await run_workload(name, REGISTRY[name], knobs, file)
            print(json.dumps(out), flush=True)
            res = out["results"]
            failed += bool(res.get("error") or res.get("timed_out"))
            outs.append(out)
        if len(outs) > 1:
            keep_median(name, outs, knobs.results_dir)
    log(f"{len(names)} workload(s) in {time.monotonic() - t0:.0f} s; {failed} failed or timed out")
    return 1 if failed else 0


def keep_median(name: str, outs: list[dict[str, Any]], results: Path) -> None:
    """Copy the median run to <name>.json and .png, with every run's figures and their
    medians under ``repeats``; print that summary as one more JSON line."""
    i = repeat.median_run(name, outs)
    summary = {"median_run": i + 1, **repeat.summarize(name, outs)}
    out = {**outs[i], "repeats": summary}
    (results / f"{name}.json").write_text(json.dumps(out, indent=1) + "\n")
    png = results / f"{name}.{i + 1}.png"
    if png.exists():
        shutil.copyfile(png, results / f"{name}.png")
    print(json.dumps({"workload": name, "repeats": summary}), flush=True)
    log(f"{name}: {summary['runs']} runs; median ratios {summary['median_ratios']}")


def main(argv: list[str]) -> int:
    """Parse the workload names and run them; return the exit status."""
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE + "\n\n" + (__doc__ or ""), file=sys.stderr)
        return 0
    names = argv or list(WORKLOADS)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        print(f"unknown workload(s): {', '.join(unknown)}\n{USAGE}", file=sys.stderr)
        return 2
    return asyncio.run(run_all(names, Knobs.from_env()))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
