"""``BENCH_LOG_REDIS``: relay's own data (logs, states, live channels) on a Redis Cluster of
three primaries, or on Redis under Sentinel (a master, a replica, three sentinels), started
for the workload beside the bench's Redis (which keeps the Celery broker, and the peer), with
every node's CPU seconds and commands over the workload. ``one`` (the default): everything
on the bench's one Redis, as ``make run`` has it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis

from tests.cluster import Cluster
from tests.sentinel import Sentinels

KINDS = ("one", "cluster", "sentinel")


class LogRedis:
    """Start and stop the deployment; read its nodes' counters."""

    def __init__(self, kind: str, workdir: Path) -> None:
        if kind not in KINDS:
            raise ValueError(f"BENCH_LOG_REDIS={kind!r}: one of {', '.join(KINDS)}")
        self.kind = kind
        self.workdir = workdir
        self.cluster: Cluster | None = None
        self.sentinels: Sentinels | None = None
        self.roles: dict[str, tuple[str, int]] = {}  # name -> (host, port)

    def start(self) -> str | None:
        """The deployment's relay URL (RELAY_LOG_REDIS_URL); None for ``one``."""
        if self.kind == "cluster":
            self.cluster = Cluster(self.workdir / "cluster").start()
            for i, node in enumerate(self.cluster.nodes):
                self.roles[f"primary{i}"] = (node.address, node.port)
            return self.cluster.url
        if self.kind == "sentinel":
            self.sentinels = Sentinels(self.workdir / "sentinel").start()
            for name, node in zip(("master", "replica"), self.sentinels.nodes, strict=True):
                self.roles[name] = (node.address, node.port)
            return self.sentinels.url
        return None

    def counters(self) -> dict[str, dict[str, Any]]:
        """Each node's CPU seconds and calls per command so far."""
        out: dict[str, dict[str, Any]] = {}
        for name, (host, port) in self.roles.items():
            client = redis.Redis(host=host, port=port, socket_timeout=5)
            try:
                cpu = client.info("cpu")
                stats = client.info("commandstats")
            finally:
                client.close()
            out[name] = {
                "cpu_s": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
                "calls": {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()},
            }
        return out

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()
        if self.sentinels is not None:
            self.sentinels.stop()


def _most(item: tuple[str, int]) -> int:
    return -item[1]


def delta(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What each node did between two readings (our own INFO calls included, a few)."""
    nodes: dict[str, Any] = {}
    for name, now in after.items():
        then = before.get(name, {"cpu_s": 0.0, "calls": {}})
        calls = {k: v - then["calls"].get(k, 0) for k, v in now["calls"].items()}
        nodes[name] = {
            "cpu_s": round(now["cpu_s"] - then["cpu_s"], 3),
            "commands_total": sum(calls.values()),
            "commands": dict(
                sorted(((k, v) for k, v in calls.items() if v), key=lambda kv: -kv[1])
            ),
        }
    return {"nodes": nodes, "cpu_s": round(sum(n["cpu_s"] for n in nodes.values()), 3)}
