"""A worker's generation in-process, for the fast tier: ``run_generation`` with relay's own
engine, chunk log and group appender, against a real Redis and a real database, and a
generator that yields what the test scripts. No worker process, no broker."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import redis
from sqlalchemy import Engine, event
from sqlalchemy.engine import ExceptionContext

from models.chunklog import ChunkLog
from models.db import OUTAGE_ERRORS, make_engine, make_sessionmaker
from models.settings import Settings
from models.tables import Message, Stream
from tests.conftest import guest_chat
from workers.appender import GroupAppender
from workers.generators import GenerationRequest
from workers.runtime import Shutdown, WorkerRuntime


class Scripted:
    """A generator of the test's own: the pieces (and the fault's moments) its script
    yields, recorded as they go out."""

    name = "scripted"
    supports_continuation = False

    def __init__(self) -> None:
        self.script: Callable[[], Iterator[str]] = lambda: iter(())
        self.sent: list[str] = []

    def generate(self, request: GenerationRequest) -> Generator[str, None, None]:
        for piece in self.script():
            self.sent.append(piece)
            yield piece

    @property
    def text(self) -> str:
        return "".join(self.sent)


def pieces(start: int, count: int, pause_s: float = 0.002) -> Iterator[str]:
    """``count`` short pieces, paced so that checkpoints fall between them."""
    for n in range(start, start + count):
        time.sleep(pause_s)
        yield f"w{n} "


@dataclass
class Worker:
    """What a worker process has, built in the test: relay's engine, log and writer."""

    rt: WorkerRuntime
    engine: Engine
    generator: Scripted
    # The database errors relay's engine met: "outage: <type>: <message>" when relay
    # treats it as an outage (models.db.OUTAGE_ERRORS), else "other: ...".
    faults: list[str] = field(default_factory=list)
    sent: list[tuple[str, str]] = field(default_factory=list)  # tasks it sent again

    def new_stream(self, prompt: str = "Through a database outage") -> Stream:
        """A committed turn as the web tier leaves it: a question, a pending answer, a
        queued stream, and the log's state marked queued."""
        with self.rt.sessions() as db:
            chat = guest_chat(db)
            question = Message(chat_id=chat.id, position=0, role="user", content=prompt)
            answer = Message(chat_id=chat.id, position=1, role="assistant", status="pending")
            db.add_all([question, answer])
            db.flush()
            stream = Stream(chat_id=chat.id, message_id=answer.id, status="queued")
            db.add(stream)
            db.commit()
        self.rt.log.init(stream.id)
        return stream

    def stored(self, stream_id: str) -> tuple[Stream, Message]:
        with self.rt.sessions() as db:
            stream = db.get(Stream, stream_id)
            assert stream is not None
            message = db.get(Message, stream.message_id)
            assert message is not None
            return stream, message


def _short_busy_timeout(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.execute("PRAGMA busy_timeout=100")


@contextmanager
def in_process_worker(
    database_url: str, redis_client: redis.Redis, settings: Settings
) -> Iterator[Worker]:
    """relay's worker runtime on ``database_url`` (SQLite's busy timeout cut to 0.1 s) and
    ``redis_client``, recording the database errors it meets and the tasks it sends."""
    engine = make_engine(database_url)
    if database_url.startswith("sqlite"):
        event.listen(engine, "connect", _short_busy_timeout)  # after relay's own pragmas
    faults: list[str] = []

    def met(context: ExceptionContext) -> None:
        kind = "outage" if isinstance(context.sqlalchemy_exception, OUTAGE_ERRORS) else "other"
        original = context.original_exception
        faults.append(f"{kind}: {type(original).__name__}: {original}")

    event.listen(engine, "handle_error", met)
    chunks = ChunkLog(redis_client)
    generator = Scripted()
    sent: list[tuple[str, str]] = []
    rt = WorkerRuntime(
        settings=settings,
        sessions=make_sessionmaker(engine),
        log=chunks,
        generator=generator,
        enqueue=lambda sid, task: sent.append((sid, task)),
        is_revoked=lambda _task: False,
        shutdown=Shutdown(settings.shutdown_grace_s),
        appender=GroupAppender(chunks, budget_s=settings.backend_budget_s),
        worker_name="test-worker",
    )
    try:
        yield Worker(rt, engine, generator, faults, sent)
    finally:
        engine.dispose()


def with_settings(w: Worker, **changes: Any) -> None:
    w.rt.settings = replace(w.rt.settings, **changes)
