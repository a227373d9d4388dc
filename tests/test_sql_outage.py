"""The database fault path in-process: a worker's generation (``run_generation``, its
``LogWriter`` and the sweeper) against a real Redis and a real SQLite or PostgreSQL that
stops taking relay's writes mid-answer. No web server, no worker process: seconds each.

The fault is real, never a stand-in for relay's code:

- SQLite: another connection holds the file's write lock (``BEGIN EXCLUSIVE``), so relay's
  writes fail with ``database is locked`` (OperationalError). Reads still work (WAL). relay
  waits its busy timeout before it gives up, 30 s hard-coded in ``models.db``; the test adds
  a connect hook to relay's engine that lowers it to 0.1 s, so the same error comes at once.
- PostgreSQL (TEST_DATABASE_URL): another connection holds ACCESS EXCLUSIVE locks on the
  test's own tables, and every backend that queues behind them is terminated, as a server
  going down terminates its sessions (``terminating connection due to administrator
  command``, an OperationalError). The shared server itself is never stopped.

What docs/operations.md ("What each failure costs", the database row) promises: running
generations go on (checkpoints are skipped, the Redis log has every piece); the final write is
retried for up to RELAY_BACKEND_BUDGET_S; an answer that ends during a longer outage leaves its
end in Redis, and the sweeper stores it and writes the terminal event once the database is
back: nothing is lost, and the answer ends ``done``, never ``failed``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from models import store
from models.db import normalize_url
from models.events import CHUNK, DONE, Event
from models.settings import Settings
from tests.client import wait_for
from tests.inproc import Worker, in_process_worker, pieces, with_settings
from workers import generation
from workers.generation import run_generation

HANG_GUARD_S = 30.0  # no step of these tests comes near it; it only turns a hang into a failure


# -- the faults ---------------------------------------------------------------------------


class SqliteLock:
    """Another connection holds the database file's write lock."""

    kind = "sqlite"
    error = "database is locked"

    def __init__(self, url: str) -> None:
        path = normalize_url(url).split("///", 1)[1]
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                    timeout=HANG_GUARD_S)  # fmt: skip
        self.held = False

    def begin(self) -> None:
        self.conn.execute("BEGIN EXCLUSIVE")  # waits for a write of relay's in progress
        self.held = True

    def end(self) -> None:
        if self.held:
            self.conn.execute("ROLLBACK")
            self.held = False

    def close(self) -> None:
        self.end()
        self.conn.close()


class PgCutOff:
    """relay's statements on ``tables`` are cut off: one connection holds ACCESS EXCLUSIVE
    locks on them, and every backend waiting behind those locks (only relay's, on this test's
    private schema) is terminated, as a server shutting down terminates its sessions."""

    kind = "postgresql"
    error = "terminating connection due to administrator command"

    def __init__(self, url: str, tables: str = "streams, messages") -> None:
        self.engine = create_engine(normalize_url(url), poolclass=NullPool)
        self.tables = tables
        self.holder: Connection | None = None
        self.stop = threading.Event()
        self.killer: threading.Thread | None = None

    def begin(self) -> None:
        self.holder = self.engine.connect()
        self.holder.execute(text(f"LOCK TABLE {self.tables} IN ACCESS EXCLUSIVE MODE"))
        pid: int = self.holder.execute(text("SELECT pg_backend_pid()")).scalar_one()
        self.stop.clear()
        self.killer = threading.Thread(target=self._kill, args=(pid,), daemon=True)
        self.killer.start()

    def _kill(self, holder_pid: int) -> None:
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            while not self.stop.wait(0.02):
                conn.execute(
                    text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                         "WHERE CAST(:holder AS integer) = ANY(pg_blocking_pids(pid))"),
                    {"holder": holder_pid},
                )  # fmt: skip

    def end(self) -> None:
        self.stop.set()
        if self.killer is not None:
            self.killer.join(HANG_GUARD_S)
            self.killer = None
        if self.holder is not None:
            self.holder.rollback()  # the locks go with the transaction
            self.holder.close()
            self.holder = None

    def close(self) -> None:
        self.end()
        self.engine.dispose()


Outage = SqliteLock | PgCutOff


@contextmanager
def outage_on(url: str, **pg: str) -> Iterator[Outage]:
    fault: Outage = SqliteLock(url) if url.startswith("sqlite") else PgCutOff(url, **pg)
    try:
        yield fault
    finally:
        fault.close()


@pytest.fixture
def worker(fresh_database_url: str, redis_client: redis.Redis) -> Iterator[Worker]:
    settings = Settings(
        database_url=fresh_database_url,
        redis_url="",
        backend_budget_s=1.0,  # tests that need longer say so
        checkpoint_interval_s=0.05,
        heartbeat_interval_s=0.5,
        heartbeat_stale_s=3.0,
        sweep_interval_s=0.5,
    )
    with in_process_worker(fresh_database_url, redis_client, settings) as w:
        yield w


def assert_ended_done_everywhere(w: Worker, stream_id: str) -> list[Event]:
    """The log holds every piece the generator sent, seqs 1..n without a gap, then ``done``;
    SQL holds the same text, ended ``done`` at the same seq, and replays the same events."""
    events = w.rt.log.read(stream_id, 0, 100_000)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.type for e in events] == [CHUNK] * (len(events) - 1) + [DONE]
    streamed = "".join(e.text for e in events if e.type == CHUNK)
    assert streamed == w.generator.text
    assert w.rt.log.state(stream_id).status == "done"
    stream, message = w.stored(stream_id)
    assert (stream.status, stream.error_code, stream.last_seq) == ("done", None, len(events))
    assert (message.status, message.content) == ("complete", streamed)
    assert stream.content_hash == store.content_hash(streamed)
    assert store.events_from_sql(stream, message.content, 0) == events
    return events


def outage_errors(w: Worker, fault: Outage) -> list[str]:
    """The errors relay met that are this fault's, and that relay treats as an outage."""
    return [f for f in w.faults if fault.error in f and f.startswith("outage: ")]


# -- the tests --------------------------------------------------------------------------------


def test_checkpoints_that_fail_while_the_database_is_down_do_not_stop_the_answer(
    worker: Worker, fresh_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The database goes away mid-answer for longer than RELAY_BACKEND_BUDGET_S: each
    checkpoint fails, the answer goes on in the log without a gap, and once the database
    answers again the end is stored with exactly the log's text."""
    w = worker
    stream = w.new_stream()
    sid = stream.id
    seen: dict[str, int] = {}

    with outage_on(fresh_database_url) as fault:

        def script() -> Iterator[str]:
            n, began = 0, time.monotonic()
            while not w.stored(sid)[1].content:  # checkpoints land while SQL is up
                assert time.monotonic() - began < HANG_GUARD_S
                yield from pieces(n, 5)
                n += 5
            seen["stored_before"] = n
            fault.begin()
            seen["log_at_start"] = w.rt.log.state(sid).last_seq
            began, first = time.monotonic(), n
            # On, past the budget, until several checkpoints have failed.
            while (len(outage_errors(w, fault)) < 3
                   or time.monotonic() - began < w.rt.settings.backend_budget_s + 0.5):  # fmt: skip
                assert time.monotonic() - began < HANG_GUARD_S
                yield from pieces(n, 5)
                n += 5
            seen["failed_in_outage"] = len(outage_errors(w, fault))
            seen["log_in_outage"] = w.rt.log.state(sid).last_seq
            seen["sent_in_outage"] = n - first
            fault.end()
            yield from pieces(n, 30)

        w.generator.script = script
        with caplog.at_level(logging.WARNING, logger="relay.worker"):
            assert run_generation(w.rt, sid, sid) == "done"

    assert seen["stored_before"] > 0
    assert seen["failed_in_outage"] >= 3  # checkpoints did meet the outage ...
    assert seen["log_in_outage"] > seen["log_at_start"]  # ... and the log grew meanwhile
    assert seen["sent_in_outage"] >= 20
    assert all(f.startswith("outage: ") for f in w.faults), w.faults
    events = assert_ended_done_everywhere(w, sid)
    assert len(events) == len(w.generator.sent) + 1
    assert "checkpoint: the database is unreachable" in caplog.text
    assert "the database answers again" in caplog.text
    assert "generator crashed" not in caplog.text
    assert w.sent == []  # nothing was handed to another worker


def test_an_answer_that_ends_while_the_database_is_down_is_stored_once_it_is_back(
    worker: Worker, fresh_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The answer's last piece goes out, then the database goes away: the final write is
    tried again until the database is back (within the budget), and the answer ends ``done``
    in SQL and in the log: never ``failed``, never left to the sweeper."""
    w = worker
    with_settings(w, backend_budget_s=HANG_GUARD_S)  # the outage ends well within it
    sid = w.new_stream().id

    with outage_on(fresh_database_url) as fault:

        def script() -> Iterator[str]:
            yield from pieces(0, 40)
            fault.begin()  # after the last piece: only the end meets the outage

        w.generator.script = script
        with (
            caplog.at_level(logging.WARNING, logger="relay.worker"),
            ThreadPoolExecutor(1) as pool,
        ):
            running: Future[str] = pool.submit(run_generation, w.rt, sid, sid)
            # The final write has failed twice (tried again, not given up) ...
            wait_for(lambda: len(outage_errors(w, fault)) >= 2 or running.done(),
                     timeout=HANG_GUARD_S)  # fmt: skip
            assert not running.done()
            # ... and nothing has ended the answer meanwhile, in either store.
            assert w.rt.log.state(sid).status == "running"
            assert w.rt.log.read(sid, 0, 1000)[-1].type == CHUNK
            fault.end()
            assert running.result(timeout=HANG_GUARD_S) == "done"

    assert "final write: the database is unreachable" in caplog.text
    assert "the sweeper stores the end" not in caplog.text
    assert w.rt.log.state(sid).pending_end is None
    assert_ended_done_everywhere(w, sid)


def test_an_end_that_outlasts_the_budget_is_left_in_the_log_and_stored_by_the_sweeper(
    worker: Worker, fresh_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The database stays down past RELAY_BACKEND_BUDGET_S (1 s here) after the answer's last
    piece: the writer leaves the end in the log's state and steps aside (no terminal event,
    nothing ``failed``); once the database is back, the sweeper stores it in SQL and writes
    the terminal event: ``done`` in both, with the log's text."""
    w = worker
    sid = w.new_stream().id

    with outage_on(fresh_database_url) as fault:

        def script() -> Iterator[str]:
            yield from pieces(0, 40)
            fault.begin()

        w.generator.script = script
        with caplog.at_level(logging.WARNING, logger="relay.worker"):
            assert run_generation(w.rt, sid, sid) == "end-pending"
        assert len(outage_errors(w, fault)) >= 2  # tried again within the budget first
        state = w.rt.log.state(sid)
        assert state.status == "running"
        assert state.pending_end is not None and state.pending_end["status"] == "done"
        assert state.pending_end["error"] is None
        events = w.rt.log.read(sid, 0, 1000)
        assert [e.type for e in events] == [CHUNK] * len(w.generator.sent)  # no end yet
        fault.end()

    assert "the sweeper stores the end" in caplog.text
    # Nothing ended it while the database was away: SQL still has it running.
    stream, message = w.stored(sid)
    assert (stream.status, message.status) == ("running", "streaming")
    report = w.rt.sweeper().sweep()
    assert report.ended == [sid]
    assert report.requeued == [] and report.exhausted == []
    assert_ended_done_everywhere(w, sid)
    assert w.sent == []


def test_a_sweep_while_the_database_refuses_writes_keeps_the_end_for_later(
    worker: Worker, fresh_database_url: str
) -> None:
    """An outage in which SQL still answers reads but refuses writes (SQLite: another process
    holds the write lock; PostgreSQL here: the messages table is cut off, as a disk full or a
    lock would): a sweep that meets it cannot store the end, and must leave it for a later
    sweep. Expected: once the database takes writes again, the next sweep stores ``done``."""
    w = worker
    sid = w.new_stream().id

    with outage_on(fresh_database_url, tables="messages") as fault:

        def script() -> Iterator[str]:
            yield from pieces(0, 40)
            fault.begin()

        w.generator.script = script
        assert run_generation(w.rt, sid, sid) == "end-pending"
        with pytest.raises(OperationalError):
            w.rt.sweeper().sweep()  # the sweeper reads its candidates, the write fails
        fault.end()

    report = w.rt.sweeper().sweep()
    assert report.ended == [sid], (w.rt.log.state(sid), report)
    assert_ended_done_everywhere(w, sid)


def test_a_database_down_when_the_attempt_starts_leaves_the_log_empty_and_raises(
    worker: Worker, fresh_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database stops taking writes between the job's read and its "running" write: the
    write is tried again for RELAY_BACKEND_BUDGET_S, then the outage is raised (Celery
    retries the task with backoff). The write goes beside the model's request, so the model
    was asked; its first piece waited for the write and was never written: the request was
    closed, nothing reached the log, and SQL still has the stream queued for the retry."""
    w = worker
    sid = w.new_stream().id
    with outage_on(fresh_database_url) as fault:
        read_job = generation.load_job

        def read_then_fault(rt: Any, stream_id: str) -> Any:
            job = read_job(rt, stream_id)
            fault.begin()
            return job

        monkeypatch.setattr(generation, "load_job", read_then_fault)
        w.generator.script = lambda: pieces(0, 10)
        with pytest.raises(OperationalError):
            run_generation(w.rt, sid, sid)
        assert len(outage_errors(w, fault)) >= 2  # tried again within the budget
        fault.end()
    assert w.generator.sent == ["w0 "]  # asked for the next piece only once the write ended
    assert w.rt.log.read(sid, 0, 100) == []
    assert w.stored(sid)[0].status == "queued"  # the retried task starts it again
