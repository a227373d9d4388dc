"""`make run` on its own: embedded Redis, migrations, web + worker from the Procfile, scaling
with honcho, and a clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
import requests

from ops.redis_server import free_port
from tests.client import Client, wait_for
from tests.procs import BIN, ROOT


@contextmanager
def make_run(tmp_path: Path, args: str = "", **env: str) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``make run`` in its own process group with its var/ directory under tmp_path."""
    environ = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATABASE_URL"}}
    environ.update(RELAY_VAR_DIR=str(tmp_path), SECRET_KEY="run-test", **env)
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "run", f"ARGS={args}"], cwd=ROOT, env=environ,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    started: set[int] = set()
    try:
        wait_for(lambda: _up(int(environ["PORT"])), timeout=60, interval=0.2)
        started = _descendants(proc.pid)
        yield proc
    finally:
        _stop_all(proc, started | _descendants(proc.pid))
        log.close()


def _stop_all(proc: subprocess.Popen[bytes], pids: set[int]) -> None:
    """SIGTERM the launcher's group (it stops honcho, web, workers and Redis), then SIGKILL
    by pid whatever is left: honcho's children and Redis run in sessions of their own."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_make_run_serves_and_stops_everything_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    with make_run(tmp_path, PORT=str(port), WEB_CONCURRENCY="1") as proc:
        output = (tmp_path / "run.log").read_text()
        assert f"http://127.0.0.1:{port}/" in output
        assert (tmp_path / "relay.db").exists()  # SQLite under the var dir
        client = Client(f"http://127.0.0.1:{port}")
        posted = client.post_chat("hello from make run [demo:words=15]")
        assert client.attach(posted["streamId"]).last["type"] == "done"
        started = _descendants(proc.pid)
        assert len(started) >= 4  # launcher, honcho, gunicorn (+worker), celery, redis
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(60) is not None
        time.sleep(0.5)
        alive = [p for p in started if _alive(p)]
        assert alive == [], (tmp_path / "run.log").read_text()
        assert "embedded Redis stopped" in (tmp_path / "run.log").read_text()


def test_procfile_scales_workers_with_honcho(tmp_path: Path) -> None:
    port = free_port()
    with make_run(
        tmp_path, "-c worker=3", PORT=str(port), WEB_CONCURRENCY="2",
        RELAY_WORKER_CONCURRENCY="1",
    ) as proc:  # fmt: skip
        output = (tmp_path / "run.log").read_text()
        url = output.split("embedded Redis on ", 1)[1].split()[0]
        client = Client(f"http://127.0.0.1:{port}")
        posted = [client.post_chat(f"share {i} [demo:words=60]") for i in range(6)]
        for p in posted:
            assert client.attach(p["streamId"]).last["type"] == "done"
        r = redis.Redis.from_url(url, decode_responses=True)
        writers = {r.hget(f"relay:{{{p['streamId']}}}:state", "worker") for p in posted}
        r.close()
        assert len(writers) == 3  # every one of the three workers took a share
        # Each worker is a Celery node of its own name (Procfile: honcho's process name).
        ping = subprocess.run(
            [str(BIN / "celery"), "-A", "workers", "inspect", "ping", "--json", "--timeout", "5"],
            env={**os.environ, "REDIS_URL": url}, cwd=ROOT, capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        nodes = {name.split("@")[0] for name in json.loads(ping.stdout)}
        assert nodes == {"worker.1", "worker.2", "worker.3"}, ping.stdout + ping.stderr
        metrics = client.request("GET", "/metrics").text
        assert 'relay_attaches_total{kind="new",transport="ws"} 6.0' in metrics  # both web
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def _descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True)
    children: dict[int, list[int]] = {}
    for line in out.stdout.splitlines():
        child, parent = (int(x) for x in line.split())
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _up(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok
    except requests.RequestException:  # not listening yet, or still loading the app
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split()[2] != "Z"
