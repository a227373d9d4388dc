"""relay's SQL engine (models/db.py) on a real database: on PostgreSQL a pooled connection is
pinged before use only when it sat idle, and a dead one is replaced; SQLite is never pinged.
The faults are real: the server terminates the pooled connection's backend."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import OperationalError

from models.db import IDLE_PING_S, OUTAGE_ERRORS, engine_from_settings, make_engine
from models.settings import Settings
from tests.conftest import PG_URL

# A server that ends a connection: PostgreSQL's tests, run when TEST_DATABASE_URL is set (as
# every database test is on PostgreSQL); SQLite is a file, with nothing to end or to ping.
on_postgresql = pytest.mark.skipif(not PG_URL, reason="needs TEST_DATABASE_URL (PostgreSQL)")
only_postgresql = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def pings(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Each ping of the engine's dialect, recorded (the real one runs)."""
    calls: list[Any] = []
    real = engine.dialect.do_ping

    def ping(dbapi_conn: Any) -> bool:
        calls.append(dbapi_conn)
        return real(dbapi_conn)

    monkeypatch.setattr(engine.dialect, "do_ping", ping)
    return calls


def backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def terminate(database_url: str, pid: int) -> None:
    """The server ends one backend, as a restart or an idle timeout would."""
    other = make_engine(database_url)
    try:
        with other.connect() as conn:
            ended = conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            assert ended.scalar_one() is True
            conn.commit()
    finally:
        other.dispose()


def test_a_hot_connection_is_not_pinged_and_an_idle_one_is(
    engine: Engine, pings: list[Any], database_url: str
) -> None:
    for _ in range(5):
        with engine.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
    assert pings == []  # new, then used again at once
    if engine.dialect.name == "sqlite":
        time.sleep(IDLE_PING_S + 0.1)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        assert pings == []  # a file: nothing to ping
        return
    time.sleep(IDLE_PING_S + 0.1)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    assert len(pings) == 1


@on_postgresql
@only_postgresql
def test_an_idle_connection_the_server_ended_is_replaced_without_an_error(
    engine: Engine, pings: list[Any], database_url: str
) -> None:
    first = backend_pid(engine)
    terminate(database_url, first)
    time.sleep(IDLE_PING_S + 0.1)
    second = backend_pid(engine)  # the ping found it dead: a new connection, no error
    assert second != first
    assert len(pings) == 1


@on_postgresql
@only_postgresql
def test_a_hot_connection_the_server_ended_fails_once_as_an_outage(
    engine: Engine, pings: list[Any], database_url: str
) -> None:
    """Used again within IDLE_PING_S, the dead connection is not pinged: its statement fails
    as an outage (a 503 or a worker's retry), and the next checkout has a live one."""
    first = backend_pid(engine)
    terminate(database_url, first)
    with pytest.raises(OperationalError) as failed, engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert isinstance(failed.value, OUTAGE_ERRORS)
    assert failed.value.connection_invalidated
    assert backend_pid(engine) != first
    assert pings == []


def held_backends(engine: Engine, count: int) -> set[int]:
    """Check out ``count`` connections at once (a burst of transactions), hand them back, and
    return their server processes."""
    conns = [engine.connect() for _ in range(count)]
    try:
        return {int(c.execute(text("SELECT pg_backend_pid()")).scalar_one()) for c in conns}
    finally:
        for conn in conns:
            conn.close()


@on_postgresql
@only_postgresql
def test_a_burst_as_large_as_the_pool_keeps_its_connections(database_url: str) -> None:
    """Twenty transactions at once, twice: the second burst runs on the connections of the
    first. (With a pool of 10 and 20 overflow, the 10 beyond the pool were closed when handed
    back and opened again: a server process forked and ended for each, which under load was
    a tenth of a worker's CPU in the chaos test.)"""
    engine = engine_from_settings(Settings(database_url=database_url))
    try:
        first = held_backends(engine, 20)
        assert len(first) == 20
        assert held_backends(engine, 20) == first
    finally:
        engine.dispose()


@on_postgresql
@only_postgresql
def test_the_pool_is_sized_by_its_settings(database_url: str) -> None:
    """RELAY_DB_POOL_SIZE connections are kept; RELAY_DB_MAX_OVERFLOW more may be opened for a
    burst, and each of those is closed when handed back."""
    settings = Settings(database_url=database_url, db_pool_size=2, db_max_overflow=3)
    engine = engine_from_settings(settings)
    try:
        first = held_backends(engine, 5)
        assert len(first) == 5
        again = held_backends(engine, 5)
        assert len(first & again) == 2  # the pool's two; the overflow's three were new
    finally:
        engine.dispose()
