"""The measuring tools: the load generators and the fake upstream, in Node (the default) or
in Python (``BENCH_LOADGEN=python``, ``BENCH_UPSTREAM=python``).

Both implementations speak the same protocols and report the same figures: the JSON-lines
commands of bench/loadgen.py and the HTTP API of bench/upstream.py. The Node ones
(bench/node/) cost the shared cores several times less per message; their one dependency,
``ws``, is installed with ``npm ci`` from bench/node/package-lock.json the first time.
"""

from __future__ import annotations

import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.config import BENCH_DIR, Knobs
from bench.procs import npm_ci

NODE_DIR = BENCH_DIR / "node"
KINDS = ("node", "python")


@dataclass(frozen=True)
class Tools:
    """Which implementation runs the load generators and which the upstream."""

    loadgen: str = "node"
    upstream: str = "node"

    @classmethod
    def from_knobs(cls, knobs: Knobs) -> Tools:
        tools = cls(knobs.bench_loadgen.strip().lower(), knobs.bench_upstream.strip().lower(),
                    tuple(shlex.split(knobs.bench_node_args)))  # fmt: skip
        for knob, kind in (("BENCH_LOADGEN", tools.loadgen), ("BENCH_UPSTREAM", tools.upstream)):
            if kind not in KINDS:
                raise ValueError(f"{knob}={kind!r}: expected one of {', '.join(KINDS)}")
        return tools

    @property
    def uses_node(self) -> bool:
        return "node" in (self.loadgen, self.upstream)

    node_args: tuple[str, ...] = ()  # BENCH_NODE_ARGS, e.g. --cpu-prof --cpu-prof-dir=/tmp/p

    def loadgen_argv(self, outdir: Path) -> list[str]:
        """Return the command of one load generator process (latency files go to outdir)."""
        if self.loadgen == "node":
            return [_node(), *self.node_args, str(NODE_DIR / "loadgen.mjs"), str(outdir)]
        return [sys.executable, "-m", "bench.loadgen", str(outdir)]

    def upstream_argv(self, chars: int) -> list[str]:
        """Return the command of the fake upstream."""
        if self.upstream == "node":
            script = str(NODE_DIR / "upstream.mjs")
            return [_node(), *self.node_args, script, "--chunk-chars", str(chars)]
        return [sys.executable, "-m", "bench.upstream", "--chunk-chars", str(chars)]

    async def prepare(self, logdir: Path) -> None:
        """Install the Node tools' locked dependencies when they are missing."""
        if not self.uses_node:
            return
        _node()
        if not (NODE_DIR / "node_modules" / "ws").is_dir():
            why = await npm_ci(NODE_DIR, logdir)
            if why is not None:
                raise RuntimeError(f"bench/node: {why} (or choose BENCH_LOADGEN/UPSTREAM=python)")


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not installed: install it, or set BENCH_LOADGEN=python "
                           "and BENCH_UPSTREAM=python")  # fmt: skip
    return node
