"""web.chats against real SQL and a real Redis: what the status endpoints build from both."""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import pytest
import redis
from sqlalchemy.orm import Session

from models import store
from models.chunklog import ChunkLog
from models.db import make_engine, make_sessionmaker
from models.events import Event, error_event
from models.tables import Stream
from tests.test_store import make_stream
from web.chats import stream_json
from web.runtime import Runtime


class LogOnly:
    """The part of the web runtime ``stream_json`` reads: the chunk log."""

    def __init__(self, log: ChunkLog) -> None:
        self.log = log


@pytest.fixture
def sessions(database_url: str) -> Iterator[tuple[Session, Session]]:
    engine = make_engine(database_url)
    factory = make_sessionmaker(engine)
    with factory() as web, factory() as worker:
        yield web, worker
    engine.dispose()


def test_a_stream_that_ends_between_the_sql_read_and_the_log_read_shows_its_error(
    sessions: tuple[Session, Session], redis_client: redis.Redis
) -> None:
    """The endpoint reads the row, then the log's state. A worker that ends the stream in
    between (SQL first, then the terminal event) must not give ``failed`` with no error."""
    web, worker = sessions
    log = ChunkLog(redis_client)
    made = make_stream(worker)
    sid = made.id
    log.init(sid)
    attempt = log.claim(sid, "task", stale_after_s=30).attempt
    assert store.mark_running(worker, sid, made.message_id, attempt, "task")
    log.append(sid, attempt, Event(1, "chunk", text="Hi"))
    row = web.get(Stream, sid)  # the web tier's read: still running
    assert row is not None and row.status == "running"

    error = store.ErrorInfo("generation_failed", "the model went away")
    assert store.finalize(
        worker, sid, status="failed", text="Hi", layout=[2], attempt=attempt, error=error
    )
    log.append(sid, attempt, error_event(2, error.code, error.message))

    shown = stream_json(cast(Runtime, LogOnly(log)), row)
    assert shown["status"] == "failed"
    assert shown["error"] == {"code": "generation_failed", "message": "the model went away"}
    assert shown["finishedAt"] is not None and shown["lastSeq"] == 2
