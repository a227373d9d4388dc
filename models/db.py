"""SQL engine and sessions; SQLite by default, PostgreSQL in production."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

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


def make_engine(url: str) -> Engine:
    """Create an engine; SQLite gets WAL and a busy timeout so web and workers share it."""
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
    return create_engine(
        url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_timeout=POOL_WAIT_S
    )


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
