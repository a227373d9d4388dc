"""The benchmark's knobs: environment variables named like the peer's, with the issue's sizes."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_DIR.parent
WORKLOADS = ("latency", "fanout", "catchup", "throughput", "throughput10", "idle", "dispatch")
# Micro-benchmarks (the chunk log, the sweeper at scale, a client's floor for a catch-up); run
# only when named.
EXTRA_WORKLOADS = ("log", "sweep", "clientfloor")


@dataclass(frozen=True)
class Knobs:
    """Every knob; each field is read from the environment variable of its upper-case name."""

    s: int = 200  # latency: streams
    r: float = 20.0  # latency: chunks/s per stream
    d: float = 15.0  # latency and fanout: seconds
    v: int = 1000  # fanout: viewers of the one stream
    fanout_r: float = 0.0  # fanout: chunks/s (0: R)
    stagger: int = 1  # 1 spreads paced streams over one period; 0 puts them in phase
    chunk_chars: int = 20
    catchup_chunks: int = 10_000
    catchup_readers: str = "1,100,1000"
    catchup_reps: int = 20
    catchup_warmup: int = 300  # viewers that catch up once before the cases, not counted
    catchup_read_timeout_s: float = 120.0
    tp_streams: int = 20
    tp_chunks: int = 5_000
    tp_readers: int = 1
    tp10_readers: int = 10
    idle_viewers: int = 10_000
    idle_streams: int = 200  # 50 viewers each: the worker holds as many as in latency
    idle_wait_s: float = 20.0
    idle_chunks: int = 3
    idle_rate: float = 1.0
    dispatch_n: int = 200
    dispatch_chunks: int = 5
    dispatch_warmup: int = 5
    dispatch_ttft_ms: float = 0.0  # the model's time to its first delta (0: at once)
    attach_conc: int = 100
    attach_settle_s: float = 1.0
    viewers_per_proc: int = 5_000
    loadgen_procs: int = 0  # 0: one per VIEWERS_PER_PROC viewers
    timeout_s: float = 0.0  # 0: each workload's own hard limit
    bench_peer: int = 1
    bench_loadgen: str = "node"  # the viewers: node (bench/node/loadgen.mjs) or python
    bench_upstream: str = "node"  # the fake upstream: node (bench/node/upstream.mjs) or python
    bench_node_args: str = ""  # extra node options for those (e.g. --cpu-prof)
    peer_dir: str = ""
    bench_relay_root: str = ""
    bench_results_dir: str = ""
    bench_keep_tmp: int = 0
    bench_log_redis: str = "one"  # relay's data: one (the bench's Redis), cluster, sentinel
    bench_database_url: str = ""  # relay's SQL: "" a SQLite file; a PostgreSQL URL: a schema
    bench_repeat: int = 1  # runs of each workload; above 1, the medians too (bench/repeat.py)

    @classmethod
    def from_env(cls) -> Knobs:
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = os.environ.get(f.name.upper(), "")
            if raw != "":
                values[f.name] = type(getattr(cls, f.name))(raw)
        return cls(**values)

    @property
    def fanout_rate(self) -> float:
        return self.fanout_r or self.r

    @property
    def relay_root(self) -> Path:
        return Path(self.bench_relay_root or PROJECT_ROOT).resolve()

    @property
    def results_dir(self) -> Path:
        return Path(self.bench_results_dir or BENCH_DIR / "results")

    @property
    def peer_path(self) -> Path:
        return Path(self.peer_dir or PROJECT_ROOT.parent / "shared/peers/resumable-stream")

    def loadgens(self, viewers: int) -> int:
        """Return how many load generator processes share ``viewers`` (round-robin)."""
        return self.loadgen_procs or max(1, math.ceil(viewers / self.viewers_per_proc))

    def catchup_counts(self) -> list[int]:
        return [int(x) for x in self.catchup_readers.split(",") if x.strip()]

    def timeout(self, workload: str) -> float:
        """Return the hard limit of one workload, in seconds."""
        if self.timeout_s:
            return self.timeout_s
        own = {"latency": self.d + 150, "fanout": self.d + 150, "catchup": 1200,
               "throughput": 400, "throughput10": 400, "idle": self.idle_wait_s + 400,
               "dispatch": 120 + 6 * self.dispatch_n, "log": 300, "sweep": 300,
               "clientfloor": 300}  # fmt: skip
        return own[workload]

    def public(self) -> dict[str, Any]:
        """Return the knobs as recorded in every result (paths made plain strings)."""
        out = asdict(self)
        out["bench_relay_root"] = str(self.relay_root)
        return out
