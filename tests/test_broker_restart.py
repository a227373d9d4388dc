"""Redis restarted under two busy workers that run as the Procfile's do (Gossip and Mingle on):
both survive every restart, and every answer ends done with its text whole.

Before ops/kombufix.py, about one restart in three killed a worker with "Unrecoverable error:
AttributeError(\"'NoneType' object has no attribute 'hostname'\")": kombu closed the task
channel only after it had cut the transport off its connection, and that close restores the
unacknowledged messages with parameters read from the missing connection (the module's
docstring says how)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from ops.redis_server import EmbeddedRedis, free_port
from tests.client import Attach, assert_coherent, read_rest, wait_for
from tests.conftest import Stack, migrated_database, stack_env
from tests.procs import BIN, Proc, start_web

ANSWER = "[demo:words=200]"
RESTARTS = 3
OUTAGE_S = 1.0
CHATS_PER_RESTART = 6


def start_procfile_worker(stack: Stack, name: str) -> Proc:
    """A worker started as the Procfile starts it, Gossip and Mingle included (Gossip's
    pub/sub channel is the one that reports the outage first). It has more slots than answers,
    so its BRPOP is waiting for the next task when Redis goes away."""
    args = [
        str(BIN / "celery"), "-A", "workers", "worker",
        "--pool", "gevent", "--concurrency", "50",
        "--hostname", f"{name}-{os.getpid()}@%h",
        "--loglevel", "INFO",
    ]  # fmt: skip
    proc = Proc(f"worker-{name}", args, stack.env, stack.logdir)
    stack.extra.append(proc)
    return proc


def connects(worker: Proc) -> int:
    """How many times the worker's consumer has connected to the broker."""
    return worker.output().count("] Connected to ")


def wait_ready(worker: Proc) -> None:
    wait_for(lambda: " ready." in worker.output() or not worker.alive(), timeout=60)
    assert worker.alive(), worker.output()


def restart_redis(server: EmbeddedRedis, workers: list[Proc]) -> None:
    """Restart Redis on the same data and wait until each worker's consumer has connected
    again, or has died.

    Redis drops its pub/sub clients a moment before it stops (SIGTERM: it writes its
    append-only file and exits). A plain restart kills an unrepaired worker only when the
    worker reads Gossip's dead socket before the BRPOP's, which depends on how file
    descriptors were reused: about one restart in three. Dropping the pub/sub clients first
    makes that order certain, so the test fails without the repair every time."""
    before = [connects(w) for w in workers]
    with redis.Redis(host="127.0.0.1", port=server.port) as admin:
        admin.client_kill_filter(_type="pubsub")
    server.stop()
    time.sleep(OUTAGE_S)
    server.start()
    wait_for(
        lambda: all(connects(w) > n or not w.alive() for w, n in zip(workers, before, strict=True)),
        timeout=60,
    )


@contextmanager
def two_busy_workers(tmp_path: Path) -> Iterator[tuple[Stack, EmbeddedRedis, list[Proc]]]:
    """A web process and two Procfile workers on a Redis of their own that keeps its data
    across a restart."""
    server = EmbeddedRedis(tmp_path / "redis", persistent=True).start()
    try:
        with migrated_database("sqlite", tmp_path) as database_url:
            env = stack_env(server.url, database_url)
            port = free_port()
            stack = Stack(env, tmp_path, port, start_web(env, port, tmp_path), [])
            try:
                workers = [start_procfile_worker(stack, name) for name in ("w1", "w2")]
                for worker in workers:
                    wait_ready(worker)
                yield stack, server, workers
            finally:
                stack.stop()
    finally:
        server.stop()


def test_workers_survive_redis_restarts_under_load(tmp_path: Path) -> None:
    with two_busy_workers(tmp_path) as (stack, server, workers):
        client = stack.client()
        posted = []
        for restart in range(RESTARTS):
            batch = [
                client.post_chat(f"Restart {restart}, chat {i} {ANSWER}")
                for i in range(CHATS_PER_RESTART)
            ]
            for chat in batch:  # taken by a worker: delivered, not yet acknowledged
                client.wait_status(chat["streamId"], {"running"})
            posted += batch
            restart_redis(server, workers)
            for worker in workers:
                assert worker.alive(), f"died at restart {restart + 1}"
        for chat in posted:
            events = read_rest(client, chat["streamId"], Attach())
            assert events[-1]["type"] == "done"
            assert_coherent(client, chat["chatId"], events)
        for worker in workers:
            assert worker.alive()
            assert "Unrecoverable error" not in worker.output()
