"""Identity and exposure: the secret key (atomic, never empty, required in production), the
address make run's web process listens on, Fetch Metadata beside Origin, /metrics' token."""

from __future__ import annotations

import logging
import multiprocessing
import time
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest
import requests

from models.settings import Settings
from ops.redis_server import free_port
from tests.conftest import Stack
from tests.procs import BIN, ROOT, Proc
from web import local_secret_key, secret_key


def _race(var_dir: str, barrier: Barrier, out: Queue[str]) -> None:
    barrier.wait()
    out.put(local_secret_key(Path(var_dir)))


def test_processes_starting_together_agree_on_one_key(tmp_path: Path) -> None:
    """Twelve processes make the key at the same instant: one wins, all read its key.
    Forked, not spawned: a spawned child imports this module, so the suite's fixtures and the
    whole web app, twelve times (a second of CPU each), before it reaches the barrier."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(12)
    out: Queue[str] = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path), barrier, out)) for _ in range(12)]
    for p in procs:
        p.start()
    keys = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len(set(keys)) == 1 and len(keys[0]) == 64
    assert [f.name for f in tmp_path.iterdir()] == ["secret_key"]  # no half-written leftovers


def test_a_generated_key_is_announced_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Once, by the process that made it: a deployment on several machines without
    SECRET_KEY sees that each machine made a key of its own."""
    with caplog.at_level(logging.WARNING, logger="relay"):
        key = local_secret_key(tmp_path)
        assert local_secret_key(tmp_path) == key  # read, not made again
    made = [r.getMessage() for r in caplog.records if "generated a secret key" in r.getMessage()]
    assert made == [f"relay: generated a secret key in {tmp_path / 'secret_key'} (set SECRET_KEY "
                    "to share one key between machines)"]  # fmt: skip


def test_an_empty_key_file_is_refused_not_used(tmp_path: Path) -> None:
    (tmp_path / "secret_key").write_text("\n")
    with pytest.raises(RuntimeError, match="is empty"):
        local_secret_key(tmp_path)


def test_production_requires_a_secret_key(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="SECRET_KEY must be set"):
        secret_key(Settings(env="production"), tmp_path)
    assert secret_key(Settings(env="production", secret_key="s3"), tmp_path) == "s3"
    assert not (tmp_path / "secret_key").exists()


def test_a_production_web_process_without_a_key_refuses_to_start(stack: Stack) -> None:
    env = {k: v for k, v in stack.env.items() if k != "SECRET_KEY"}
    env.update(RELAY_ENV="production", PORT=str(free_port()), WEB_CONCURRENCY="1")
    args = [str(BIN / "gunicorn"), "--config", str(ROOT / "gunicorn.conf.py"), "web:create_app()"]
    proc = Proc("web-production", args, env, stack.logdir)
    try:
        proc.popen.wait(60)
    finally:
        proc.kill()
    assert proc.popen.returncode != 0
    assert "SECRET_KEY must be set when RELAY_ENV=production" in proc.output()


def test_the_web_process_listens_on_loopback_unless_host_says_otherwise(stack: Stack) -> None:
    for host, expected in ((None, "127.0.0.1"), ("0.0.0.0", "0.0.0.0")):
        port = free_port()
        env = {**stack.env, "PORT": str(port), "WEB_CONCURRENCY": "1"}
        if host:
            env["HOST"] = host
        args = [str(BIN / "gunicorn"), "--config", str(ROOT / "gunicorn.conf.py"),
                "web:create_app()"]  # fmt: skip
        proc = Proc("web-bind", args, env, stack.logdir)
        try:
            deadline = time.monotonic() + 60
            while "Listening at" not in proc.output() and time.monotonic() < deadline:
                assert proc.alive(), proc.output()
                time.sleep(0.1)
            assert f"Listening at: http://{expected}:{port}" in proc.output()
        finally:
            proc.kill()


def test_a_cross_site_write_without_origin_is_refused(stack: Stack) -> None:
    client = stack.client()
    for site in ("cross-site", "same-site"):
        resp = client.request(
            "POST", "/api/v1/chat", json={"message": "hi"}, headers={"Sec-Fetch-Site": site}
        )
        assert resp.status_code == 403, resp.text
        assert resp.json()["error"]["code"] == "forbidden_origin"
    ok = client.request(
        "POST", "/api/v1/chat", json={"message": "hi [demo:words=5]"},
        headers={"Sec-Fetch-Site": "same-origin"},
    )  # fmt: skip
    assert ok.status_code == 202, ok.text


def test_metrics_can_require_a_token(stack: Stack) -> None:
    _web, port = stack.start_web_with(RELAY_METRICS_TOKEN="m3trics")
    url = f"http://127.0.0.1:{port}/metrics"
    refused = requests.get(url, timeout=15)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    wrong = requests.get(url, headers={"Authorization": "Bearer nope"}, timeout=15)
    assert wrong.status_code == 401
    ok = requests.get(url, headers={"Authorization": "Bearer m3trics"}, timeout=15)
    assert ok.status_code == 200 and "relay_" in ok.text
