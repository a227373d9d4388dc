"""``make run``: embedded Redis (when REDIS_URL is unset), migrations, then the Procfile's
processes under supervisord (ops/supervise.py), which restarts any that dies.

Each step prints one line with its time (``relay: [start 2/4] ... 1.3 s``). The processes'
output passes through this launcher, which watches it for the end of the start-up: every
process RUNNING for supervisord, every Celery node ready, every gunicorn worker loaded, and
``GET /`` and ``GET /readyz`` answering 200. Only then does it print
``relay is ready: http://127.0.0.1:8000/``, so that line is the last of the start-up.

The embedded Redis's URL is recorded in ``var/redis.url`` while it runs, so admin commands
run from the project folder find it (models/settings.py). Ctrl-C or SIGTERM stops
supervisord (and with it web and workers), then the embedded Redis.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import IO
from urllib.parse import urlsplit, urlunsplit

import requests

from models.settings import PROJECT_ROOT, REDIS_URL_FILE, VAR_DIR
from ops import supervise
from ops.redis_server import EmbeddedRedis
from ops.step import Step

STEPS = 4
# The launcher's own readiness requests: their access-log lines are left out of the output.
PROBE_AGENT = "relay-run-startup-probe"
# Once the page answers, how long the rest of the start-up may take before the ready line is
# printed anyway, naming what has not reported yet.
REST_OF_STARTUP_S = 30.0


def step(n: int, what: str) -> Step:
    return Step(f"[start {n}/{STEPS}] {what}")


def say(text: str) -> None:
    print(f"relay: {text}", flush=True)


def shown(path: Path) -> str:
    """A path as the user knows it: relative to the project when it is inside."""
    try:
        return str(path.relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def build_env() -> tuple[dict[str, str], EmbeddedRedis | None]:
    env = dict(os.environ)
    # The Procfile names gunicorn and celery: find them in this virtualenv.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PORT", "8000")
    env.setdefault("DATABASE_URL", f"sqlite:///{VAR_DIR / 'relay.db'}")
    # /metrics adds up every gunicorn worker process through this directory (emptied here).
    metrics_dir = VAR_DIR / "prometheus"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    embedded = None
    if not env.get("REDIS_URL"):
        embedded = EmbeddedRedis(VAR_DIR / "redis", persistent=True)
        data = shown(embedded.workdir)
        with step(1, f"starting the embedded Redis on {embedded.url} (data in {data})"):
            embedded.start()
        env["REDIS_URL"] = embedded.url
        _record_redis_url(embedded.url)
    else:
        say(f"[start 1/{STEPS}] Redis: REDIS_URL is {without_password(env['REDIS_URL'])}")
    return env, embedded


def _record_redis_url(url: str) -> None:
    """Tell admin commands run from the project folder which Redis this stack uses."""
    partial = REDIS_URL_FILE.with_suffix(".url.tmp")
    partial.write_text(url + "\n")
    partial.replace(REDIS_URL_FILE)


def migrate(env: dict[str, str]) -> None:
    """Apply the migrations; their output is shown only when they fail."""
    url = without_password(env["DATABASE_URL"])
    with step(2, f"applying the database migrations ({url})"):
        done = subprocess.run(
            [sys.executable, "-m", "models.migrate"],
            env=env,
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            raise MigrationFailed(done.stdout + done.stderr, done.returncode)


class MigrationFailed(Exception):
    def __init__(self, output: str, code: int) -> None:
        super().__init__(output)
        self.output = output
        self.code = code


def page_url(env: dict[str, str]) -> str:
    """Where the web process answers (gunicorn.conf.py binds HOST:PORT)."""
    host = env.get("HOST") or "127.0.0.1"
    if host in {"0.0.0.0", "::", "[::]"}:  # every interface: this machine reaches it here
        host = "127.0.0.1"
    elif ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{env['PORT']}/"


class Startup:
    """Watches the processes' output and the page; prints step 4 and the ready line.

    Every write to stdout goes through ``lock``, and the processes' output is written in
    whole lines, so the launcher's own lines never land inside one of theirs."""

    def __init__(self, names: list[str], url: str | None, started: float) -> None:
        self.lock = threading.Lock()
        self.url = url
        self.started = started
        self.running = set(names)  # not yet RUNNING for supervisord
        self.nodes = {n for n in names if n.startswith("worker")}  # Celery: not yet ready
        self.booted = 0  # gunicorn worker processes booted ...
        self.loaded = 0  # ... and loaded (ops/gctune.py logs once each is about to serve)
        self.page = url is None
        self.ready = threading.Event()
        self.broken_pipe = False

    # -- the processes' output (supervisord's stdout) ------------------------------------

    def relay(self, stream: IO[bytes]) -> None:
        """Copy the processes' output to ours, line by line, until supervisord exits."""
        fd = stream.fileno()
        pending = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += chunk
            lines, sep, pending = pending.rpartition(b"\n")
            if sep:
                self._lines(lines + sep)
            if len(pending) > 65536:  # a very long line: do not hold it back
                self._write(pending)
                pending = b""
        if pending:
            self._write(pending)

    def _lines(self, data: bytes) -> None:
        kept = []
        for line in data.splitlines(keepends=True):
            if PROBE_AGENT.encode() in line:
                continue  # our own readiness requests in gunicorn's access log
            kept.append(line)
            if not self.ready.is_set():
                kept.append(self._watch(line.decode(errors="replace")).encode())
        self._write(b"".join(kept))
        self._maybe_ready()

    def _watch(self, line: str) -> str:
        """Note what the line says of the start-up; return a line to add after it, if any."""
        if "entered RUNNING state" in line:
            self.running = self.running - {line.split("success: ", 1)[-1].split(" ", 1)[0]}
        elif "entered FATAL state" in line:
            name = line.split("gave up: ", 1)[-1].split(" ", 1)[0]
            return (
                f"relay: {name} kept exiting at start and was given up (its output is above)"
                "; fix it, then Ctrl-C and make run again\n"
            )
        elif line.rstrip().endswith(" ready."):
            self.nodes = {n for n in self.nodes if f" {n}@" not in line}
        elif "Booting worker with pid" in line:
            self.booted += 1
        elif "relay.gc" in line and "start-up objects frozen" in line:
            self.loaded += 1
        return ""

    def _write(self, data: bytes) -> None:
        if not data:
            return
        with self.lock:
            if self.broken_pipe:
                return  # nobody reads our output any more: keep draining supervisord's
            try:
                sys.stdout.buffer.write(data)
                sys.stdout.buffer.flush()
            except OSError:
                self.broken_pipe = True

    # -- the page --------------------------------------------------------------------------

    def poll_page(self) -> None:
        """Wait until ``GET /`` and ``GET /readyz`` both answer 200, then say so."""
        if self.url is None:
            return
        while not _answers(self.url) or not _answers(f"{self.url}readyz"):
            time.sleep(0.2)
        took = time.monotonic() - self.started
        self._write(
            f"relay: [start 4/{STEPS}] the page answers: {self.url}"
            f"  (GET / and /readyz are 200, {took:.1f} s after the start)\n".encode()
        )
        self.page = True
        self._maybe_ready()
        if not self.ready.wait(REST_OF_STARTUP_S):
            self._announce(late=True)

    # -- the ready line --------------------------------------------------------------------

    def missing(self) -> list[str]:
        """What has not reported the end of its start-up yet."""
        missing = [f"{n} (RUNNING)" for n in sorted(self.running)]
        missing += [f"{n} (Celery ready)" for n in sorted(self.nodes)]
        if self.loaded < self.booted:
            missing.append(f"{self.booted - self.loaded} web worker process(es)")
        if not self.page:
            missing.append("the page")
        return missing

    def _maybe_ready(self) -> None:
        if not self.ready.is_set() and self.page and not self.missing():
            self._announce(late=False)

    def _announce(self, late: bool) -> None:
        with self.lock:
            if self.ready.is_set():
                return
            self.ready.set()
        where = self.url or "no web process in this run"
        line = f"relay is ready: {where}  (Ctrl-C stops everything)"
        if sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
            line = f"\033[1;32m{line}\033[0m"  # bold green
        note = ""
        if late:
            note = f"relay: still starting: {', '.join(self.missing())}\n"
        self._write(f"\n{note}{line}\n\n".encode())


def _answers(url: str) -> bool:
    # No keep-alive: an idle connection left open would hold a web worker at shutdown.
    headers = {"User-Agent": PROBE_AGENT, "Connection": "close"}
    try:
        return requests.get(url, headers=headers, timeout=2).status_code == 200
    except requests.RequestException:  # not listening yet, or still loading the app
        return False


def supervise_processes(argv: list[str], env: dict[str, str], started: float) -> int:
    """Run supervisord in the foreground until Ctrl-C or SIGTERM; return its exit code."""
    env = {**env, **supervise.dotenv(PROJECT_ROOT)}
    conf, programs = supervise.write_config(argv, env, PROJECT_ROOT, VAR_DIR / "supervisor")
    names = [p.name for p in programs]
    web = any(name.startswith("web.") for name in names)
    say(
        f"[start 3/{STEPS}] starting {', '.join(names)} under supervisord "
        f"({shown(conf)}); their output follows"
    )
    bindir = Path(sys.executable).parent
    # supervisord writes its log and every process's output (stdout_logfile=/dev/stdout) to
    # this pipe; Startup.relay copies it to our stdout and watches it.
    supervisord = subprocess.Popen(
        [str(bindir / "supervisord"), "--nodaemon", "--configuration", str(conf)],
        env=env,
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert supervisord.stdout is not None

    def forward(signum: int, _frame: FrameType | None) -> None:
        if supervisord.poll() is None:
            supervisord.send_signal(signal.SIGTERM)

    try:
        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
    except BaseException:  # a stop signal came before our handlers: pass it on
        forward(signal.SIGTERM, None)
        supervisord.wait()
        raise
    startup = Startup(names, page_url(env) if web else None, started)
    relay = threading.Thread(target=startup.relay, args=(supervisord.stdout,), daemon=True)
    relay.start()
    threading.Thread(target=startup.poll_page, daemon=True).start()
    code = supervisord.wait()
    relay.join(5)  # the rest of its output
    return code


def _exit_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    """Before supervisord runs, SIGTERM unwinds like Ctrl-C so the embedded Redis stops."""
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    started = time.monotonic()
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    env, embedded = build_env()
    try:
        migrate(env)
        return supervise_processes(argv, env, started)
    except MigrationFailed as failed:
        sys.stdout.write(failed.output)
        say(f"the migrations failed (exit status {failed.code}); nothing else was started")
        return failed.code
    finally:
        if embedded is not None:
            REDIS_URL_FILE.unlink(missing_ok=True)
            embedded.stop()
            say("embedded Redis stopped")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
