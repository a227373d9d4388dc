"""Fixtures: a private Redis, migrated databases (SQLite always, PostgreSQL when
TEST_DATABASE_URL is set), and a running stack of real web and worker processes."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from models.db import normalize_url
from models.migrate import upgrade
from ops.redis_server import EmbeddedRedis, free_port
from tests.client import Client
from tests.procs import Proc, start_web, start_worker

PG_URL = os.environ.get("TEST_DATABASE_URL", "")
BACKENDS = ["sqlite", "postgresql"] if PG_URL else ["sqlite"]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@contextmanager
def migrated_database(kind: str, tmpdir: Path) -> Iterator[str]:
    """A freshly migrated database: a SQLite file, or a private PostgreSQL schema."""
    if kind == "sqlite":
        url = f"sqlite:///{tmpdir / 'relay.db'}"
        upgrade(url)
        yield url
        return
    schema = f"relay_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(normalize_url(PG_URL))
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    url = f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    try:
        upgrade(url)
        yield url
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="session", params=BACKENDS)
def database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The session's database, shared by the running stack."""
    with migrated_database(request.param, tmp_path_factory.mktemp("db")) as url:
        yield url


@pytest.fixture(params=BACKENDS)
def fresh_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of this test's own."""
    with migrated_database(request.param, tmp_path) as url:
        yield url


@dataclass
class Stack:
    """A running relay: one gunicorn (gevent) web process and one Celery worker."""

    env: dict[str, str]
    logdir: Path
    port: int
    web: Proc
    workers: list[Proc]
    extra: list[Proc] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, base_url: str | None = None) -> Client:
        return Client(base_url or self.base_url)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.env["REDIS_URL"], decode_responses=True)

    def start_web(self, port: int | None = None) -> tuple[Proc, int]:
        port = port or free_port()
        proc = start_web(self.env, port, self.logdir)
        self.extra.append(proc)
        return proc, port

    def start_web_with(self, connections: int = 2000, **env: str) -> tuple[Proc, int]:
        """A second web process with extra environment settings."""
        port = free_port()
        proc = start_web({**self.env, **env}, port, self.logdir, connections=connections)
        self.extra.append(proc)
        return proc, port

    def start_worker(self, name: str) -> Proc:
        proc = start_worker(self.env, self.logdir, name)
        self.extra.append(proc)
        return proc

    def stop(self) -> None:
        """Throw the stack away: web processes get SIGTERM together, workers SIGKILL (a
        Celery worker's warm shutdown takes 3-4 s even when idle; the tests that promise
        something about a graceful stop do it themselves)."""
        procs = [*self.extra, self.web, *self.workers]
        for proc in procs:
            if proc.name.startswith("worker"):
                proc.kill()
            elif proc.alive():
                proc.popen.terminate()
        for proc in procs:
            proc.stop()


def stack_env(redis_url: str, database_url: str) -> dict[str, str]:
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
        RELAY_SHUTDOWN_GRACE_S="1",
    )
    return env


@pytest.fixture(scope="session")
def stack(
    redis_server: EmbeddedRedis, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    # Each database backend gets its own Redis database, so two stacks never share a queue.
    db_index = BACKENDS.index("postgresql" if database_url.startswith("postgres") else "sqlite")
    redis_url = f"redis://127.0.0.1:{redis_server.port}/{db_index}"
    env = stack_env(redis_url, database_url)
    logdir = tmp_path_factory.mktemp("logs")
    worker = start_worker(env, logdir)
    port = free_port()
    try:
        web = start_web(env, port, logdir)
    except Exception:
        worker.stop()
        raise
    running = Stack(env, logdir, port, web, [worker])
    yield running
    running.stop()


# Redis database numbers for isolated stacks; each is flushed when its stack stops.
_isolated = itertools.cycle(range(3, 16))


@pytest.fixture
def isolated_stack(
    redis_server: EmbeddedRedis, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Stack]:
    """A stack of this test's own (own Redis database, own SQLite file, own web process)
    with no worker yet, for tests that kill, stop or add workers. Start workers with
    ``stack.start_worker(name)``; extra settings come from a ``stack_env`` marker."""
    marker = request.node.get_closest_marker("stack_env")
    extra: dict[str, str] = dict(marker.kwargs) if marker else {}
    with migrated_database("sqlite", tmp_path) as database_url:
        env = stack_env(f"redis://127.0.0.1:{redis_server.port}/{next(_isolated)}", database_url)
        env.update(extra)
        port = free_port()
        web = start_web(env, port, tmp_path)
        running = Stack(env, tmp_path, port, web, [])
        try:
            yield running
        finally:
            running.stop()
            running.redis().flushdb()  # our own server and database number


@pytest.fixture
def client(stack: Stack) -> Client:
    """A new user (fresh cookie jar) on the stack's web server."""
    return stack.client()


@pytest.fixture
def redis_client(redis_server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(f"redis://127.0.0.1:{redis_server.port}/2", decode_responses=True)
    client.flushdb()  # our own server, our own database number: never a shared one
    yield client
    client.flushdb()
    client.close()
