"""Real processes for the tests: gunicorn web servers and Celery workers, stopped by pid."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


class Proc:
    """A child process with its output in a log file."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], logdir: Path):
        self.name = name
        self.log_path = logdir / f"{name}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            args, env=dict(env), cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the process (and its children: gunicorn's workers, say)."""
        if self.alive():
            _kill_children(self.pid)
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()
        self._log.close()

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self.popen.wait()
        self._log.close()


def _kill_children(pid: int) -> None:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    for child in out.split():
        os.kill(int(child), signal.SIGKILL)


# How long a process may take to start (a hang guard, not an expectation): seconds when the
# machine is quiet, but a Celery worker took over 30 s at the end of a CI run, with the chaos
# test starting three workers at once beside four test processes and their browsers.
START_TIMEOUT_S = 90.0


def start_web(
    env: Mapping[str, str],
    port: int,
    logdir: Path,
    timeout: float = START_TIMEOUT_S,
    connections: int = 2000,
    *,
    prefix: Sequence[str] = (),
    address: str = "127.0.0.1",
    bind: str | None = None,
    name: str = "web",
) -> Proc:
    """A gunicorn web process listening on ``bind`` (default ``address``) and ``port``,
    started through ``prefix`` (the rehearsal's ``ip netns exec``), once ``address`` answers
    its health check."""
    args = [
        *prefix,
        str(BIN / "gunicorn"),
        "--config", str(ROOT / "gunicorn.conf.py"),
        "--workers", "1",
        "--worker-connections", str(connections),
        "--bind", f"{bind or address}:{port}",
        "--graceful-timeout", "2",
        "web:create_app()",
    ]  # fmt: skip
    proc = Proc(name, args, env, logdir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"web server exited:\n{proc.output()}")
        try:
            if requests.get(f"http://{address}:{port}/healthz", timeout=1).ok:
                return proc
        except requests.RequestException:  # not listening yet, or still loading the app
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"web server did not start:\n{proc.output()}")


def start_worker(
    env: Mapping[str, str],
    logdir: Path,
    name: str = "w1",
    timeout: float = START_TIMEOUT_S,
    concurrency: int = 8,
    *,
    prefix: Sequence[str] = (),
    hostname: str | None = None,
) -> Proc:
    """A Celery worker (the Procfile's gevent pool) started through ``prefix``, once it
    says it is ready; its node name is ``hostname``, by default unique to this process."""
    args = [
        *prefix,
        str(BIN / "celery"), "-A", "workers", "worker",
        "--pool", "gevent", "--concurrency", str(concurrency),
        "--hostname", hostname or f"{name}-{os.getpid()}@%h",
        "--loglevel", "INFO",
        "--without-mingle", "--without-gossip",
    ]  # fmt: skip
    proc = Proc(f"worker-{name}", args, env, logdir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"worker exited:\n{proc.output()}")
        if " ready." in proc.output():
            return proc
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"worker did not start:\n{proc.output()}")


def stack_env(redis_url: str, database_url: str) -> dict[str, str]:
    """The environment of the tests' relay processes: the short timings of a test stack
    (heartbeat 0.5 s, stale 3 s, sweep 0.5 s, shutdown grace 1 s, checkpoint 0.5 s), and a
    small PostgreSQL pool."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "CELERY_"))}
    env.update(
        REDIS_URL=redis_url,
        DATABASE_URL=database_url,
        SECRET_KEY="test-secret-key",
        PYTHONUNBUFFERED="1",
        RELAY_DEMO_CHUNKS_PER_SECOND="80",
        RELAY_CHECKPOINT_INTERVAL_S="0.5",
        RELAY_HEARTBEAT_INTERVAL_S="0.5",
        RELAY_HEARTBEAT_STALE_S="3",
        RELAY_SWEEP_INTERVAL_S="0.5",
        # No queue positions on the feed unless a test asks (tests/test_waiting.py).
        RELAY_QUEUE_POSITION_AFTER_S="600",
        RELAY_SHUTDOWN_GRACE_S="1",
        # Tests post many answers as one user; tests/test_limits.py turns the limits on.
        RELAY_MAX_RUNNING_PER_USER="0",
        RELAY_POSTS_PER_MINUTE="0",
        RELAY_NEW_GUESTS_PER_MINUTE="0",
        # A PostgreSQL pool that four test processes' stacks fit in on one server of 100
        # connections: 5 kept per process, bursts closed when handed back (relay's 30 kept per
        # process filled it: "too many clients" in a CI-sized run).
        RELAY_DB_POOL_SIZE="5",
        RELAY_DB_MAX_OVERFLOW="20",
    )
    return env


def run_snippet(code: str, *args: str, timeout: float = 60) -> str:
    """Run ``code`` in a Python process of its own, from the project root (one that gevent
    patches, say); its standard output. A non-zero exit fails the test, with its stderr."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout
