"""Child processes of the benchmark: spawned with a log file, stopped and killed by pid."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import json
import os
import resource
import shutil
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import psutil

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    # If the orchestrator is killed outright, its children must not linger on their ports.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def die_with_parent_many_files() -> None:
    """die_with_parent, and the open-files limit raised to the hard limit (10,000 sockets in
    one load generator; Node has no setrlimit of its own to call)."""
    die_with_parent()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Child:
    """One child process, its log file, and a way to stop it (and its children) by pid."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        """Tell whether the process is still running."""
        return self.proc.returncode is None

    def tail(self, lines: int = 20) -> str:
        """Return the end of the child's log (for error reports)."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the process and every descendant, each by its own pid."""
        try:
            kids = psutil.Process(self.pid).children(recursive=True)
        except psutil.Error:
            kids = []
        for pid in [k.pid for k in kids] + [self.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """Ask the process to stop; kill it (and its children) if it has not within timeout."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.kill()
        self.kill()  # descendants a clean exit left behind
        await self.proc.wait()


async def spawn(
    name: str, argv: list[str], *, env: Mapping[str, str], cwd: Path, logdir: Path,
    pipes: bool = False, many_files: bool = False,
) -> Child:  # fmt: skip
    """Start argv with output to ``<logdir>/<name>.log`` (stdin/stdout piped when asked;
    ``many_files``: with the open-files limit at its hard limit)."""
    log = logdir / f"{name}.log"
    setup: Callable[[], None] = die_with_parent_many_files if many_files else die_with_parent
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            env=dict(env),
            cwd=cwd,
            stdin=asyncio.subprocess.PIPE if pipes else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if pipes else out,
            stderr=out,
            preexec_fn=setup,
            limit=1 << 28,
        )
    return Child(name, proc, log)


async def npm_ci(folder: Path, logdir: Path) -> str | None:
    """Install a folder's locked npm dependencies (``npm ci``); return why not, or None."""
    npm = shutil.which("npm")
    if npm is None:
        return "npm is not installed"
    child = await spawn("npm-ci", [npm, "ci", "--no-audit", "--no-fund"], env=os.environ,
                        cwd=folder, logdir=logdir)  # fmt: skip
    try:
        await asyncio.wait_for(child.proc.wait(), 600)
    except TimeoutError:
        await child.stop(timeout=5)
    return None if child.proc.returncode == 0 else f"npm ci failed: {child.tail(5)}"


class Rpc:
    """JSON-lines commands to a child over stdin/stdout, answered by ``id``."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        stdout = self.child.proc.stdout
        assert stdout is not None
        while line := await stdout.readline():
            reply = json.loads(line)
            fut = self._waiting.pop(reply.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(reply)
        for fut in self._waiting.values():  # the child died: nobody will answer
            if not fut.done():
                fut.set_exception(RuntimeError(f"{self.child.name} exited: {self.child.tail(5)}"))

    async def call(self, cmd: str, timeout: float | None = None, **args: Any) -> dict[str, Any]:
        """Send one command; return its reply, raising if the child reports an error."""
        if self._reader.done():
            raise RuntimeError(f"{self.child.name} exited: {self.child.tail(5)}")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        stdin = self.child.proc.stdin
        assert stdin is not None
        stdin.write(json.dumps({"id": rid, "cmd": cmd, **args}).encode() + b"\n")
        await stdin.drain()
        reply = await asyncio.wait_for(fut, timeout)
        if not reply.get("ok"):
            raise RuntimeError(f"{self.child.name} {cmd}: {reply.get('error')}")
        return reply

    async def clock(self) -> int:
        """Return the child's CLOCK_MONOTONIC reading in µs."""
        return int((await self.call("clock", timeout=30))["clock_us"])

    async def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, ConnectionError):
            await self.call("exit", timeout=5)
        await self.child.stop(timeout=5)
        self._reader.cancel()
