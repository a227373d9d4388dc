"""Fixtures: a private Redis, migrated databases (SQLite always, PostgreSQL when
TEST_DATABASE_URL is set), and a running stack of real web and worker processes."""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from playwright.sync_api import Browser, Page
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session as DbSession

from models.db import make_engine, make_sessionmaker, normalize_url
from models.migrate import upgrade
from models.redisconn import is_cluster, make_cluster
from models.tables import Chat, User
from ops.redis_server import EmbeddedRedis, free_port
from tests.chromium import DESKTOP, PHONE, Session, launched, new_session
from tests.client import Client
from tests.cluster import Cluster
from tests.procs import Proc, stack_env, start_web, start_worker

PG_URL = os.environ.get("TEST_DATABASE_URL", "")
BACKENDS = ["sqlite", "postgresql"] if PG_URL else ["sqlite"]
# RELAY_TEST_LOG_CLUSTER=1: every stack keeps relay's data on a Redis Cluster of its own
# (three primaries, tests/cluster.py; RELAY_LOG_REDIS_URL), the broker on the private Redis.
LOG_CLUSTER = bool(os.environ.get("RELAY_TEST_LOG_CLUSTER"))
# The browser tier's modules run on SQLite alone (``pytestmark = ON_SQLITE``): a page reaches
# the database only through the HTTP API, whose suites (test_api, test_chat_actions,
# test_feed, test_post_events, ...) run on both backends; the browser tier is a third of the
# suite's time (1,725 of 4,717 test-seconds of a run with PostgreSQL, 2026-12-04).
ON_SQLITE = pytest.mark.on_sqlite


@contextmanager
def log_store(env: dict[str, str], workdir: Path) -> Iterator[None]:
    """Point ``env``'s relay data at a cluster of its own when LOG_CLUSTER asks."""
    if not LOG_CLUSTER:
        yield
        return
    cluster = Cluster(workdir / "cluster").start()
    env["RELAY_LOG_REDIS_URL"] = cluster.url
    try:
        yield
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def counted_redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """A Redis server for one test module alone, for tests that count commands in its
    ``commandstats``. Those are per server, and the session's shared one also serves the
    stacks' sweepers, whose calls can land inside a test's count."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis-counted")).start()
    yield server
    server.stop()


def command_calls(client: redis.Redis, name: str) -> int:
    """How many times the client's server has run command ``name`` (lowercase)."""
    stats = client.info("commandstats").get(f"cmdstat_{name}", {})
    return int(stats.get("calls", 0)) if isinstance(stats, dict) else 0


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


@pytest.fixture
def db(database_url: str) -> Iterator[DbSession]:
    """A session on the session's database (the one the running stack uses)."""
    engine = make_engine(database_url)
    with make_sessionmaker(engine)() as session:
        yield session
    engine.dispose()


def guest_chat(db: DbSession, title: str = "t") -> Chat:
    """A guest user and an empty chat of theirs, flushed (ids assigned), not committed."""
    user = User(kind="guest")
    db.add(user)
    db.flush()
    chat = Chat(user_id=user.id, title=title)
    db.add(chat)
    db.flush()
    return chat


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
        """A client of relay's data (the cluster under RELAY_TEST_LOG_CLUSTER)."""
        url = self.env.get("RELAY_LOG_REDIS_URL") or self.env["REDIS_URL"]
        if is_cluster(url):
            return make_cluster(url, max_connections=20)  # type: ignore[return-value]
        return redis.Redis.from_url(url, decode_responses=True)

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

    def start_worker(self, name: str, concurrency: int = 8) -> Proc:
        proc = start_worker(self.env, self.logdir, name, concurrency=concurrency)
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


@pytest.fixture(scope="session")
def stack(
    redis_server: EmbeddedRedis, database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    # Each database backend gets its own Redis database, so two stacks never share a queue.
    db_index = BACKENDS.index("postgresql" if database_url.startswith("postgres") else "sqlite")
    redis_url = f"redis://127.0.0.1:{redis_server.port}/{db_index}"
    env = stack_env(redis_url, database_url)
    logdir = tmp_path_factory.mktemp("logs")
    with log_store(env, logdir):
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
    with own_stack(redis_server, tmp_path, dict(marker.kwargs) if marker else {}) as running:
        yield running


@contextmanager
def own_stack(
    redis_server: EmbeddedRedis, tmp_path: Path, extra: dict[str, str]
) -> Iterator[Stack]:
    """``isolated_stack``'s stack, with ``extra`` settings chosen at run time."""
    with migrated_database("sqlite", tmp_path) as database_url:
        env = stack_env(f"redis://127.0.0.1:{redis_server.port}/{next(_isolated)}", database_url)
        env.update(extra)
        with log_store(env, tmp_path):
            port = free_port()
            web = start_web(env, port, tmp_path)
            running = Stack(env, tmp_path, port, web, [])
            try:
                yield running
            finally:
                running.stop()
                # Our own server and database number (and cluster, which stops next).
                redis.Redis.from_url(env["REDIS_URL"]).flushdb()


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


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's Chromium (tests/chromium.py), one per test module."""
    with launched() as chromium:
        yield chromium


@pytest.fixture
def session(browser: Browser) -> Iterator[Session]:
    """A desktop-sized browser context of a new guest; no uncaught page error allowed."""
    yield from new_session(browser, DESKTOP)


@pytest.fixture
def phone(browser: Browser) -> Iterator[Session]:
    """The same, phone-sized."""
    yield from new_session(browser, PHONE)


@pytest.fixture
def page(session: Session) -> Page:
    return session.new_page()


LOG_TAIL_LINES = 40


# The longest tests (tens of seconds each, measured with --durations), in the order they
# start: with pytest-xdist handing out tests two at a time (the Makefile's --maxschedchunk),
# they spread over the processes from the start, and the run never ends on one of them.
LONG_FIRST = (
    "test_chaos.py::",
    "test_run.py::",
    "test_cluster.py::",
    "test_operations.py::test_a_handed_off_answer_goes_ahead_of_queued_chats",
    "test_page_chats.py::test_regenerate_replaces_the_last_answer_in_place",
    "test_operations.py::test_streams_commands",
    "test_waiting.py::",
    "test_page.py::test_scrolling_up_keeps_the_place",
    "test_sentinel.py::",
    "test_page_chats.py::test_the_code_copy_button_survives_streaming",
    "test_broker_restart.py::",
    "test_identity.py::test_processes_starting_together_agree_on_one_key",
    "test_operations.py::test_streams_retry_continues_an_answer_ended_backend_unavailable",
)


def pytest_configure(config: pytest.Config) -> None:
    """Each pytest-xdist process (and what it starts) picks free ports from a share of its
    own (ops.redis_server.free_port): two processes never pick the same one at once."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if worker.startswith("gw") and count:
        os.environ["RELAY_PORT_SHARE"] = f"{int(worker[2:])}/{int(count)}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    off = {item for item in items if on_postgresql(item) and item.get_closest_marker("on_sqlite")}
    if off:  # the browser tier: SQLite alone (ON_SQLITE); pytest counts them as deselected
        config.hook.pytest_deselected(items=list(off))
        items[:] = [item for item in items if item not in off]

    def rank(item: pytest.Item) -> int:
        return next((i for i, p in enumerate(LONG_FIRST) if p in item.nodeid), len(LONG_FIRST))

    items.sort(key=rank)  # stable: the rest keep their order


def on_postgresql(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    return callspec is not None and callspec.params.get("database_url") == "postgresql"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed test on a stack shows what its processes logged last (the logs live in a
    temporary directory that a CI run does not keep)."""
    report: pytest.TestReport = yield
    funcargs = getattr(item, "funcargs", {})
    if report.failed and call.when == "call":
        for fixture in ("stack", "isolated_stack"):
            running = funcargs.get(fixture)
            if isinstance(running, Stack):
                for proc in [running.web, *running.workers, *running.extra]:
                    tail = proc.output().splitlines()[-LOG_TAIL_LINES:]
                    report.sections.append((f"{proc.name} log (last lines)", "\n".join(tail)))
    return report
