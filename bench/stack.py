"""relay's processes for one workload, started the way ``make run`` starts them.

One gunicorn process (gunicorn.conf.py, gevent, ``--workers 1``), one Celery worker
(the Procfile's command), a migrated SQLite database with an API user (or, with
BENCH_DATABASE_URL, a PostgreSQL schema of the workload's own, dropped after it), the fake
upstream, and the load generators (Node or Python: bench/tools.py). The code under test comes from
BENCH_RELAY_ROOT (default: this checkout), with that checkout's own .venv.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import sqlalchemy

from bench.api import RelayApi, UpstreamCtl
from bench.config import PROJECT_ROOT
from bench.meter import Meter
from bench.procs import Child, Rpc, die_with_parent, spawn
from bench.stats import now_us, r3
from bench.tools import Tools
from models.db import normalize_url

_DROP = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "CELERY_BROKER_URL", "DATABASE_URL", "PORT"}


@dataclass(frozen=True)
class Sizing:
    """What the workload needs from the processes."""

    concurrency: int  # Celery threads: at least the streams generating at once
    viewers: int  # WebSocket viewers at once (gunicorn's worker_connections)
    loadgens: int  # load generator processes


def relay_env(
    root: Path, tmp: Path, redis_url: str, upstream_port: int, database_url: str = ""
) -> dict[str, str]:
    """Return the environment of relay's processes (as make run builds it, plus the upstream)."""
    env = {k: v for k, v in os.environ.items() if k not in _DROP and "proxy" not in k.lower()}
    (tmp / "prometheus").mkdir(exist_ok=True)
    env.update(
        PATH=f"{root / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        REDIS_URL=redis_url,
        DATABASE_URL=database_url or f"sqlite:///{tmp / 'relay.db'}",
        PROMETHEUS_MULTIPROC_DIR=str(tmp / "prometheus"),
        SECRET_KEY="bench",
        RELAY_VAR_DIR=str(tmp),
        RELAY_GENERATOR="openai",
        OPENAI_BASE_URL=f"http://127.0.0.1:{upstream_port}/v1",
        OPENAI_API_KEY="bench",
        RELAY_MODEL="bench",
        # The load generator is one user posting hundreds of answers: no per-user limits
        # (settings an older checkout under test simply ignores).
        RELAY_MAX_RUNNING_PER_USER="0",
        RELAY_POSTS_PER_MINUTE="0",
        RELAY_NEW_GUESTS_PER_MINUTE="0",
    )
    return env


def procfile_worker(root: Path, bindir: Path, concurrency: int) -> list[str]:
    """Return the Procfile's worker command of the code under test, with ``concurrency``."""
    # As under make run, where RELAY_WORKER_CONCURRENCY fills the Procfile's placeholder.
    lines = (root / "Procfile").read_text().splitlines()
    line = next((ln for ln in lines if ln.startswith("worker:")), None)
    if line is None:
        raise RuntimeError(f"{root / 'Procfile'} has no worker line")
    command = re.sub(r"\$\{RELAY_WORKER_CONCURRENCY:-\d+\}", str(concurrency), line[7:])
    command = re.sub(r"\$\{HONCHO_PROCESS_NAME:-([\w.-]+)\}", r"\1", command)  # one worker
    argv = shlex.split(command)
    return [str(bindir / argv[0]), *argv[1:]]


def git_describe(root: Path) -> str:
    """Return the checkout's commit (with "+dirty" when it has uncommitted changes)."""

    def git(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return out.stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain") else "")


class Stack:
    """Start, address and stop relay's processes, the upstream and the load generators."""

    def __init__(self, root: Path, tmp: Path, redis: tuple[str, int | None], sizing: Sizing,
                 chars: int, tools: Tools, log_redis_url: str | None = None,
                 postgres_url: str = "") -> None:  # fmt: skip
        self.root, self.tmp, self.sizing, self.chars = root, tmp, sizing, chars
        self.tools = tools
        self.schema = PgSchema(postgres_url) if postgres_url else None
        self.redis_url = redis[0]
        self.log_redis_url = log_redis_url  # relay's data elsewhere (BENCH_LOG_REDIS)
        self.bin = root / ".venv" / "bin"
        self.children: list[Child] = []
        self.loadgens: list[Rpc] = []
        # Redis counts among the metered processes only when the bench started it.
        self.pids: dict[str, int] = {"redis": redis[1]} if redis[1] else {}
        self.meter: Meter | None = None
        self.api: RelayApi | None = None
        self.upstream: UpstreamCtl | None = None

    async def _spawn(
        self, name: str, argv: list[str], env: dict[str, str], cwd: Path | None = None,
        pipes: bool = False, many_files: bool = False,
    ) -> Child:  # fmt: skip
        child = await spawn(name, argv, env=env, cwd=cwd or self.root, logdir=self.tmp,
                            pipes=pipes, many_files=many_files)  # fmt: skip
        self.children.append(child)
        self.pids[name] = child.pid
        return child

    async def start(self) -> None:
        """Start the upstream, prepare the database, start web, worker and load generators."""
        if not (self.bin / "gunicorn").exists():
            raise RuntimeError(f"{self.bin} has no gunicorn: run make install in {self.root}")
        await self.tools.prepare(self.tmp)
        port = await self._start_upstream()
        database_url = await asyncio.to_thread(self.schema.create) if self.schema else ""
        env = relay_env(self.root, self.tmp, self.redis_url, port, database_url)
        if self.log_redis_url is not None:
            env["RELAY_LOG_REDIS_URL"] = self.log_redis_url
        await self._run([str(self.bin / "python"), "-m", "models.migrate"], env)
        flask = str(self.bin / "flask")
        out = await self._run([flask, "--app", "web", "create-token", "bench"], env)
        token = re.search(r"token (\S+)", out)
        if token is None:
            raise RuntimeError(f"create-token printed no token: {out}")
        base = await self._start_web(env)
        self.api = RelayApi(base, token.group(1))
        await self._start_worker(env)
        for i in range(self.sizing.loadgens):
            argv = self.tools.loadgen_argv(self.tmp)
            env = {**os.environ, "BENCH_ROLE": f"loadgen{i}"}
            child = await self._spawn(f"loadgen{i}", argv, env, cwd=PROJECT_ROOT, pipes=True,
                                      many_files=True)  # fmt: skip
            self.loadgens.append(Rpc(child))
        self.meter = Meter(dict(self.pids))

    async def clock_check(self) -> dict[str, Any]:
        """Check that the upstream and every load generator read the orchestrator's clock.

        Latency is a viewer's reading minus the upstream's stamp, both CLOCK_MONOTONIC in µs
        (Python's time.monotonic_ns, Node's process.hrtime): each child's reading must fall
        between the orchestrator's reading before its request and after its reply.
        """
        assert self.upstream is not None
        children = []
        probes = [("upstream", self.upstream.clock)]
        probes += [(rpc.child.name, rpc.clock) for rpc in self.loadgens]
        for name, probe in probes:
            t0 = now_us()
            theirs = await probe()
            t1 = now_us()
            children.append({"role": name, "after_send_ms": r3((theirs - t0) / 1000),
                             "before_reply_ms": r3((t1 - theirs) / 1000)})  # fmt: skip
        ok = all(c["after_send_ms"] >= 0 and c["before_reply_ms"] >= 0 for c in children)
        if not ok:
            raise RuntimeError(f"the tools do not share the orchestrator's clock: {children}")
        return {"ok": ok, "children": children}

    async def _run(self, argv: list[str], env: dict[str, str]) -> str:
        proc = await asyncio.create_subprocess_exec(
            *argv, env=env, cwd=self.root, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, preexec_fn=die_with_parent,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{out.decode()[-2000:]}")
        return out.decode()

    async def _start_upstream(self) -> int:
        argv = self.tools.upstream_argv(self.chars)
        env = {**os.environ, "BENCH_ROLE": "upstream"}
        child = await self._spawn("upstream", argv, env, cwd=PROJECT_ROOT, pipes=True)
        assert child.proc.stdout is not None
        line = (await asyncio.wait_for(child.proc.stdout.readline(), 30)).split()
        if len(line) != 2 or line[0] != b"PORT":
            await child.stop(timeout=5)
            raise RuntimeError(f"the upstream did not start:\n{child.tail()}")
        port = int(line[1])
        self.upstream = UpstreamCtl(port)
        return port

    async def _start_web(self, env: dict[str, str]) -> str:
        conns = max(10_000, self.sizing.viewers + 1_000)
        for _attempt in range(3):  # the probed port may be taken before gunicorn binds it
            port = _free_port()
            argv = [str(self.bin / "gunicorn"), "--config", str(self.root / "gunicorn.conf.py"),
                    "--workers", "1", "--bind", f"127.0.0.1:{port}",
                    "--access-logfile", "/dev/null", "--worker-connections", str(conns),
                    "web:create_app()"]  # fmt: skip
            web = await self._spawn("web_master", argv, env)
            if await _healthy(f"http://127.0.0.1:{port}", web):
                kids = psutil.Process(web.pid).children()
                self.pids["web_worker"] = kids[0].pid
                return f"http://127.0.0.1:{port}"
            await web.stop(timeout=5)
        raise RuntimeError(f"gunicorn did not start:\n{web.tail()}")

    async def _start_worker(self, env: dict[str, str]) -> None:
        argv = procfile_worker(self.root, self.bin, self.sizing.concurrency)
        worker = await self._spawn("worker", argv, env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not worker.alive():
                break
            if " ready." in worker.log.read_text(errors="replace"):
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"celery worker did not start:\n{worker.tail()}")

    async def stop(self) -> None:
        """Stop every process this stack started, each by its pid, last started first."""
        for rpc in self.loadgens:
            await rpc.close()
        for child in reversed(self.children):
            await child.stop(timeout=15)
        for client in (self.api, self.upstream):
            if client is not None:
                await client.close()
        if self.schema is not None:
            await asyncio.to_thread(self.schema.drop)

    def kill(self) -> None:
        """SIGKILL every process this stack started (last resort)."""
        for child in self.children:
            child.kill()
        if self.schema is not None:
            try:
                self.schema.drop()
            except sqlalchemy.exc.SQLAlchemyError as exc:
                print(f"could not drop schema {self.schema.name}: {exc}", file=sys.stderr)


class PgSchema:
    """A schema of its own in the PostgreSQL database of ``url`` (BENCH_DATABASE_URL), so
    that every workload starts from an empty database as with SQLite; dropped after it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.name = f"relay_bench_{uuid.uuid4().hex[:10]}"
        self.created = False

    def _execute(self, statement: str) -> None:
        engine = sqlalchemy.create_engine(normalize_url(self.url))
        try:
            with engine.begin() as conn:
                conn.execute(sqlalchemy.text(statement))
        finally:
            engine.dispose()

    def create(self) -> str:
        """Create the schema; the URL relay's processes use it through (search_path)."""
        self._execute(f'CREATE SCHEMA "{self.name}"')
        self.created = True
        sep = "&" if "?" in self.url else "?"
        return f"{self.url}{sep}options=-csearch_path%3D{self.name}"

    def drop(self) -> None:
        if self.created:
            self._execute(f'DROP SCHEMA "{self.name}" CASCADE')
            self.created = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _healthy(base: str, web: Child, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(trust_env=False, timeout=1) as http:
        while time.monotonic() < deadline and web.alive():
            try:
                if (await http.get(f"{base}/healthz")).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.1)
    return False
