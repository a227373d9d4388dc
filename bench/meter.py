"""CPU seconds and peak RSS of every process over a measured span (psutil readings)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

from bench.stats import r3

# Processes whose CPU counts as relay's own (Redis is added from its INFO when not ours).
RELAY_PROCS = ("web_master", "web_worker", "worker", "redis")
SAMPLE_S = 0.2


def _cpu(proc: psutil.Process, with_children: bool) -> tuple[float, float]:
    try:
        t = proc.cpu_times()
        user, system = t.user, t.system
        if with_children:
            for kid in proc.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    k = kid.cpu_times()
                    user, system = user + k.user, system + k.system
        return user, system
    except psutil.Error:
        return 0.0, 0.0


def _machine_busy_s() -> float:
    """Return the CPU seconds every process on the machine has used (all cores)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0))


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:
        return 0


@dataclass
class Watched:
    """One process under the meter: its base CPU reading and RSS peak."""

    name: str
    proc: psutil.Process
    with_children: bool
    base: tuple[float, float] = (0.0, 0.0)
    peak: int = 0
    last: int = 0


@dataclass
class Meter:
    """Read CPU at start and stop; sample RSS in between to find each process's peak."""

    pids: dict[str, int]
    with_children: tuple[str, ...] = ("worker",)
    watched: list[Watched] = field(default_factory=list)
    t0: float = 0.0
    busy0: float = 0.0
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Take every process's CPU reading and start sampling RSS."""
        self.watched = []
        for name, pid in self.pids.items():
            with contextlib.suppress(psutil.Error):
                w = Watched(name, psutil.Process(pid), name in self.with_children)
                w.base = _cpu(w.proc, w.with_children)
                w.peak = w.last = _rss(w.proc)
                self.watched.append(w)
        self.t0 = time.monotonic()
        self.busy0 = _machine_busy_s()
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_S)
            for w in self.watched:
                rss = _rss(w.proc)
                if rss:
                    w.last = rss
                    w.peak = max(w.peak, rss)

    def rss(self, name: str) -> int:
        """Return the current RSS (bytes) of one watched process."""
        for w in self.watched:
            if w.name == name:
                return _rss(w.proc)
        return 0

    def read(self) -> dict[str, Any]:
        """Return CPU since start and peak RSS per process (the meter keeps running)."""
        span = time.monotonic() - self.t0
        out: dict[str, Any] = {}
        for w in self.watched:
            user, system = _cpu(w.proc, w.with_children)
            if user or system:
                w.last = _rss(w.proc) or w.last
            u, s = user - w.base[0], system - w.base[1]
            out[w.name] = {
                "pid": w.proc.pid, "cpu_s": r3(u + s), "cpu_user_s": r3(u), "cpu_sys_s": r3(s),
                "cpu_pct": r3(100 * (u + s) / span) if span > 0 else None,
                "rss_mb": r3(w.last / 2**20), "peak_rss_mb": r3(max(w.peak, w.last) / 2**20),
            }  # fmt: skip
        # What else ran on the machine meanwhile (other people's tests): the noise floor.
        ours = sum(p["cpu_s"] or 0 for p in out.values())
        others = _machine_busy_s() - self.busy0 - ours
        return {"span_s": r3(span), "procs": out, "others_cpu_pct": r3(100 * others / span)}

    def stop(self) -> dict[str, Any]:
        """Return the readings since start and stop sampling."""
        result = self.read()
        if self._task is not None:
            self._task.cancel()
        return result


def cpu_totals(procs: dict[str, Any], redis_cpu_s: float | None) -> dict[str, Any]:
    """Return relay's CPU (web + worker + Redis) and that of every process together."""
    relay = sum(p["cpu_s"] or 0 for n, p in procs.items() if n in RELAY_PROCS)
    if "redis" not in procs and redis_cpu_s is not None:
        relay += redis_cpu_s  # a Redis we did not start: its own INFO says what it spent
    everything = sum(p["cpu_s"] or 0 for p in procs.values())
    if "redis" not in procs and redis_cpu_s is not None:
        everything += redis_cpu_s
    return {"relay_cpu_s": r3(relay), "all_cpu_s": r3(everything)}
