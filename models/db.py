"""SQL engine and sessions; SQLite by default, PostgreSQL in production."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import InterfaceError, InvalidatePoolError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection

if TYPE_CHECKING:
    from models.settings import Settings

# What a database that is down, restarting or unreachable raises (an infrastructure fault,
# never a verdict on the data): callers wait and try again.
OUTAGE_ERRORS: tuple[type[Exception], ...] = (OperationalError, InterfaceError)
# SQLSTATEs of a transaction PostgreSQL aborted to break a lock conflict with another one
# (deadlock_detected, serialization_failure): the same transaction again is expected to pass.
CONFLICT_SQLSTATES = frozenset({"40P01", "40001"})


def is_lock_conflict(exc: Exception) -> bool:
    """Was ``exc`` PostgreSQL choosing this transaction as a deadlock's victim (or the like)?"""
    return getattr(getattr(exc, "orig", None), "sqlstate", None) in CONFLICT_SQLSTATES


def normalize_url(url: str) -> str:
    """Use the psycopg 3 driver for plain ``postgres://`` / ``postgresql://`` URLs."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


# A checkout waits this long for a free pooled connection before giving up (SQLAlchemy's
# TimeoutError: 503 / WebSocket 1013 "busy"). A burst of viewers queues here while the event
# loop serves those ahead; a database that is down fails its own connection attempt at once.
POOL_WAIT_S = 60.0


# PostgreSQL's pool per process (RELAY_DB_POOL_SIZE, RELAY_DB_MAX_OVERFLOW): kept, and more
# for a burst, each closed when handed back.
POOL_SIZE = 30
MAX_OVERFLOW = 0


def make_engine(url: str, pool_size: int = POOL_SIZE, max_overflow: int = MAX_OVERFLOW) -> Engine:
    """Create an engine; SQLite gets WAL and a busy timeout so web and workers share it.

    PostgreSQL's pool keeps ``pool_size`` connections once opened: a connection beyond it
    (SQLAlchemy's overflow) is closed when handed back, so a process whose load keeps more
    than the pool checked out opens and closes a connection (a server process forked and
    ended) for many of its transactions."""
    url = normalize_url(url)
    if url.startswith("sqlite"):
        _ensure_sqlite_dir(url)
        pooled = "///" in url and not url.endswith(":memory:")  # a file: a QueuePool
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            **({"pool_timeout": POOL_WAIT_S} if pooled else {}),
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_engine(
        url, pool_size=pool_size, max_overflow=max_overflow, pool_timeout=POOL_WAIT_S
    )
    ping_when_idle(engine)
    return engine


def engine_from_settings(settings: Settings) -> Engine:
    """The engine of a web or worker process: ``DATABASE_URL`` and the pool's settings."""
    return make_engine(settings.database_url, settings.db_pool_size, settings.db_max_overflow)


# A pooled connection that has been idle this long is pinged before it is handed out (and
# replaced, with every connection pooled before it, when the ping finds it dead).
IDLE_PING_S = 1.0


def ping_when_idle(engine: Engine, idle_s: float = IDLE_PING_S) -> None:
    """SQLAlchemy's ``pool_pre_ping``, for connections that sat idle ``idle_s`` or more.

    ``pool_pre_ping`` pings on every checkout: on PostgreSQL one more round trip per session
    (about 0.3 ms of a worker's CPU on a 2-core VM), on the path of every post, every
    checkpoint and every answer's end. A connection that answered less than ``idle_s`` ago
    is handed out as it is; were the database restarted in that moment, its first statement
    fails as an outage (``OUTAGE_ERRORS``: a 503, or a worker's retry) and SQLAlchemy then
    replaces every pooled connection. One that sat idle (a restart, a server-side idle
    timeout, a dropped network) is pinged as before and replaced without an error.
    """

    @event.listens_for(engine, "checkin")
    def _idle_from(_dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping_if_idle(
        dbapi_conn: Any, record: ConnectionPoolEntry, _proxy: PoolProxiedConnection
    ) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since < idle_s:
            return  # new (it just connected) or hot
        dialect = engine.dialect
        try:
            dialect.do_ping(dbapi_conn)
        except dialect.loaded_dbapi.Error as exc:
            if not dialect.is_disconnect(exc, dbapi_conn, None):
                raise
            # The pool discards every connection made before now and connects again.
            raise InvalidatePoolError(f"the pooled connection is gone: {exc}") from exc


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def _ensure_sqlite_dir(url: str) -> None:
    path = url.split("///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # With WAL, NORMAL syncs at WAL checkpoints instead of at every commit: a power cut may
    # lose the last commits but never corrupts the file (sqlite.org/pragma.html#pragma_synchronous).
    # Every answer is also in the Redis log while it matters; checkpoints stop costing an fsync.
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
