"""What a worker process needs: SQL sessions, the chunk log, the generator and hooks into
the Celery worker (revokes, shutdown), built once per process."""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from models.chunklog import ChunkLog
from models.db import engine_from_settings, make_sessionmaker
from models.lifecycle import Enqueue, Sweeper
from models.redisconn import make_client
from models.settings import Settings
from workers.appender import GroupAppender
from workers.endgate import EndGate
from workers.generators import Generator, make_generator
from workers.metrics import WorkerMetrics

log = logging.getLogger("relay.worker")


@dataclass
class Shutdown:
    """Set when the worker starts a warm shutdown; generations get a grace period to finish
    before they are handed back to the queue."""

    grace_s: float
    started_at: float | None = None

    def begin(self) -> None:
        if self.started_at is None:
            self.started_at = time.monotonic()

    @property
    def begun(self) -> bool:
        return self.started_at is not None

    def expired(self) -> bool:
        return self.started_at is not None and time.monotonic() - self.started_at >= self.grace_s


@dataclass
class WorkerRuntime:
    settings: Settings
    sessions: sessionmaker[Session]
    log: ChunkLog
    generator: Generator
    enqueue: Enqueue
    is_revoked: Callable[[str], bool]
    shutdown: Shutdown
    appender: GroupAppender
    metrics: WorkerMetrics = field(default_factory=WorkerMetrics)
    ends: EndGate = field(default_factory=EndGate)  # final SQL writes yield to the appends
    worker_name: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")

    def shutting_down(self) -> bool:
        return self.shutdown.expired()

    def connect(self) -> Connection:
        """A Core connection of the sessions' engine, for hot statements that need no ORM
        session (the checkpoint: the session's layers were a quarter of its cost)."""
        engine: Engine = self.sessions.kw["bind"]
        return engine.connect()

    def fault(self, point: str) -> None:
        """Test aid: pause at a named point (RELAY_FAULT_PAUSE=point=seconds) so a test can
        kill the worker exactly there. Unset in production."""
        for item in self.settings.fault_pause:
            name, _, seconds = item.partition("=")
            if name == point:
                log.warning("fault point %s: pausing %ss", point, seconds)
                time.sleep(float(seconds or 0))

    def sweeper(self) -> Sweeper:
        return Sweeper(
            self.log,
            self.sessions,
            self.enqueue,
            self.settings.heartbeat_stale_s,
            self.settings.queued_grace_s,
            self.settings.max_attempts,
        )


def build_runtime(
    settings: Settings, enqueue: Enqueue, is_revoked: Callable[[str], bool]
) -> WorkerRuntime:
    # Relay's own data (RELAY_LOG_REDIS_URL, a cluster possibly); the broker is Celery's.
    client = make_client(
        settings.log_redis_url or settings.redis_url, settings.redis_max_connections
    )
    chunks = ChunkLog(
        client,
        retention_s=settings.log_retention_s,
        running_ttl_s=settings.running_log_ttl_s,
        sharded=settings.sharded(),
    )
    metrics = WorkerMetrics()
    coalesce_s = settings.coalesce_ms / 1000
    return WorkerRuntime(
        settings=settings,
        sessions=make_sessionmaker(engine_from_settings(settings)),
        log=chunks,
        generator=make_generator(settings),
        enqueue=enqueue,
        is_revoked=is_revoked,
        shutdown=Shutdown(settings.shutdown_grace_s),
        appender=GroupAppender(
            chunks,
            coalesce_s=coalesce_s,
            gather=settings.append_gather,
            on_appended=metrics.appended,
            budget_s=settings.backend_budget_s,
            wait_replicas=settings.redis_wait_replicas,
            wait_ms=settings.redis_wait_ms,
        ),
        metrics=metrics,
    )


@functools.cache
def get_runtime() -> WorkerRuntime:
    """The process's runtime, built on first use (after the worker started)."""
    from celery.worker import state as worker_state

    from workers.celery_app import CONTINUE_QUEUE, GENERATE, app

    def enqueue(stream_id: str, task_id: str) -> None:
        # Workers only send continuations (hand-offs, the sweeper's re-sends): they go
        # ahead of new chats.
        app.send_task(GENERATE, args=[stream_id], task_id=task_id, queue=CONTINUE_QUEUE)

    def is_revoked(task_id: str) -> bool:
        return task_id in worker_state.revoked

    return build_runtime(Settings.from_env(), enqueue, is_revoked)
