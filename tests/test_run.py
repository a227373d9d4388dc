"""`make run` on its own: embedded Redis, migrations, web + worker, and a clean stop."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import requests

from ops.redis_server import free_port
from tests.client import Client, wait_for
from tests.procs import ROOT


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


def test_make_run_serves_and_stops_everything_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "DATABASE_URL"}}
    env.update(PORT=str(port), RELAY_VAR_DIR=str(tmp_path), WEB_CONCURRENCY="1",
               RELAY_WORKER_CONCURRENCY="2", SECRET_KEY="run-test")  # fmt: skip
    log = (tmp_path / "run.log").open("wb")
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "run"], cwd=ROOT, env=env, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        wait_for(lambda: _up(port), timeout=60, interval=0.2)
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
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _up(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok
    except requests.ConnectionError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split()[2] != "Z"
