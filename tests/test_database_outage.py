"""A database restart is not a generation failure: the writer keeps writing the log while
PostgreSQL (a private server of the test's own) is stopped, and SQL catches up after."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from models.migrate import upgrade
from ops.redis_server import EmbeddedRedis, free_port
from tests.client import assert_coherent, read_rest
from tests.conftest import Stack, stack_env
from tests.pgserver import PgServer
from tests.procs import start_web

LONG = "[demo:words=400]"  # ~5 s at the tests' 80 chunks/s


@contextmanager
def own_database_stack(tmp_path: Path, **extra: str) -> Iterator[tuple[Stack, PgServer]]:
    """A web process and a worker on a PostgreSQL and a Redis of their own."""
    with PgServer() as pg:
        pg.start()
        upgrade(pg.url)
        server = EmbeddedRedis(tmp_path / "redis").start()
        try:
            env = {**stack_env(server.url, pg.url), **extra}
            port = free_port()
            stack = Stack(env, tmp_path, port, start_web(env, port, tmp_path), [])
            try:
                stack.start_worker("w1")
                yield stack, pg
            finally:
                stack.stop()
        finally:
            server.stop()


def test_a_database_restart_mid_answer_loses_nothing(tmp_path: Path) -> None:
    """Checkpoints fail while PostgreSQL is down; the answer goes on in the log and ends
    done, with SQL holding exactly the streamed text."""
    with own_database_stack(tmp_path) as (stack, pg):
        client = stack.client()
        posted = client.post_chat(f"Through a database restart {LONG}")
        sid = posted["streamId"]
        seen = client.attach(sid, until=lambda a: len(a.events) >= 10)
        pg.stop()
        time.sleep(2)  # the outage: several checkpoints fail
        pg.start()
        events = read_rest(client, sid, seen)
        assert events[-1]["type"] == "done"
        assert_coherent(client, posted["chatId"], events)
        assert client.stream(sid)["status"] == "done"
        worker = stack.extra[0]
        assert "the database is unreachable" in worker.output()  # it did meet the outage
        assert "generator crashed" not in worker.output()


def test_an_answer_that_ends_while_the_database_is_down_is_stored_after(tmp_path: Path) -> None:
    """The answer is complete while PostgreSQL is still down past the budget: the writer
    leaves its end in the log's state and the sweeper stores it once SQL is back; viewers
    get `done` and the stored text, never a failure."""
    with own_database_stack(tmp_path, RELAY_BACKEND_BUDGET_S="1") as (stack, pg):
        client = stack.client()
        posted = client.post_chat("Short, then the database goes [demo:words=120]")
        sid = posted["streamId"]
        seen = client.attach(sid, until=lambda a: len(a.events) >= 5)
        pg.stop()
        time.sleep(5)  # the answer (1.5 s) ends during the outage; the budget is 1 s
        worker = stack.extra[0]
        assert "the sweeper stores the end" in worker.output()
        pg.start()
        events = read_rest(client, sid, seen)
        assert events[-1]["type"] == "done"
        assert_coherent(client, posted["chatId"], events)
        assert client.stream(sid)["status"] == "done"
