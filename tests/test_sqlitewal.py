"""models.sqlitewal: SQLite's WAL is copied back into the database file by a thread of its
own, so no relay commit has to do it (and sync) on its event loop."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

from models.db import make_engine
from models.sqlitewal import WalCheckpointer, sqlite_file, start_wal_checkpoints
from tests.client import wait_for


def test_the_wal_reaches_the_database_file_without_a_commit_checkpointing(
    tmp_path: Path,
) -> None:
    """A writer whose commits never checkpoint (``wal_autocheckpoint=0``) leaves its pages in
    the WAL; the checkpointer copies them into the database file, where a reader that
    opens it finds them."""
    path = tmp_path / "relay.db"
    make_engine(f"sqlite:///{path}").dispose()
    writer = sqlite3.connect(path)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.execute("CREATE TABLE t (n INTEGER, body TEXT)")
    for n in range(300):
        writer.execute("INSERT INTO t VALUES (?, ?)", (n, "x" * 2000))
        writer.commit()
    size = os.path.getsize(path)
    time.sleep(0.3)
    assert os.path.getsize(path) == size  # nothing copies the WAL back by itself
    keeper = WalCheckpointer(str(path), interval_s=0.05).start()
    try:
        # The file grows while a checkpoint copies; ``runs`` counts it once it has finished.
        wait_for(lambda: keeper.runs >= 1, timeout=10)
        assert os.path.getsize(path) > size + 300 * 2000 and keeper.failures == 0
    finally:
        keeper.stop()
    runs = keeper.runs
    time.sleep(0.3)
    assert keeper.runs <= runs + 1  # stopped (after the sleep it was in)
    copy = sqlite3.connect(f"file:{path}?immutable=1", uri=True)  # the file alone, no WAL
    assert copy.execute("SELECT count(*), sum(n) FROM t").fetchone() == (300, sum(range(300)))
    copy.close()
    writer.close()


def test_only_a_sqlite_file_gets_a_checkpointer(tmp_path: Path) -> None:
    assert sqlite_file(f"sqlite:///{tmp_path / 'a.db'}") == str(tmp_path / "a.db")
    assert sqlite_file("sqlite:///relay.db") == "relay.db"  # relative to the process's cwd
    for url in ("sqlite://", "sqlite:///:memory:", "postgresql://u@127.0.0.1:5432/x"):
        assert sqlite_file(url) is None
        assert start_wal_checkpoints(url) is None
