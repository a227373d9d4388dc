"""SQLite's WAL checkpoints, away from the event loop.

In WAL mode (models/db.py) a commit that finds the WAL past 1,000 pages copies it back into
the database file and syncs it (SQLite's ``wal_autocheckpoint``). Under gevent that runs on
the process's one event loop: on the benchmark's VM, an ``fdatasync`` of 2-4.5 ms every 1-3.5
s inside the worker's commits (its checkpoints of running answers), every stream of the
process waiting meanwhile (docs/performance.md).

``WalCheckpointer`` runs a PASSIVE checkpoint every ``interval_s`` from a native thread of
its own, on a connection of its own. Python's sqlite3 releases the GIL while SQLite copies
and syncs, so the loop goes on, and the WAL is copied back long before a commit would find
it past the limit. PASSIVE never waits for a reader or a writer (what they still use is
copied the next time). SQLite's automatic checkpoint stays on as the backstop: if this
thread stops, commits checkpoint as before. The web and worker processes start one each;
a short-lived command checkpoints when its last connection closes.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from gevent.monkey import get_original
from sqlalchemy.engine import make_url

# Native ones, whether or not gevent has patched this process: the thread must really sleep
# (a patched sleep would need a gevent hub in that thread).
_start_native_thread: Any = get_original("_thread", "start_new_thread")
_native_sleep: Any = get_original("time", "sleep")

INTERVAL_S = 1.0


def sqlite_file(database_url: str) -> str | None:
    """The database file of a SQLite URL; None for an in-memory one or another database."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return str(url.database)


class WalCheckpointer:
    """A native thread that checkpoints one SQLite database's WAL every ``interval_s``."""

    def __init__(self, path: str, interval_s: float = INTERVAL_S) -> None:
        self.path = path
        self.interval_s = interval_s
        self.runs = 0  # checkpoints done
        self.failures = 0  # checkpoints that met an error (another checkpoint running, ...)
        self._stopped = False

    def start(self) -> WalCheckpointer:
        _start_native_thread(self._run, ())
        return self

    def stop(self) -> None:
        """The thread ends after its current sleep."""
        self._stopped = True

    def _run(self) -> None:
        # timeout=0: a checkpoint that finds another one running fails at once, and is
        # tried again at the next interval.
        conn = sqlite3.connect(self.path, timeout=0, check_same_thread=False)
        try:
            while not self._stopped:
                _native_sleep(self.interval_s)
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                    self.runs += 1
                except sqlite3.Error:
                    self.failures += 1
        finally:
            conn.close()


def start_wal_checkpoints(
    database_url: str, interval_s: float = INTERVAL_S
) -> WalCheckpointer | None:
    """Start checkpointing the WAL of ``database_url`` when it is a SQLite file."""
    path = sqlite_file(database_url)
    return WalCheckpointer(path, interval_s).start() if path else None
