"""The web tier's resources (SQL, Redis, the chunk log, the hub, Celery), one set per app."""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field

from celery import Celery
from flask import Flask, current_app, g
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from models.chunklog import ChunkLog
from models.db import engine_from_settings, make_sessionmaker
from models.redisconn import broker_settings, make_client
from models.settings import Settings
from web import shutdown
from web.catchup import BlockCache
from web.hub import Hub, make_hub

log = logging.getLogger("relay.web")


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    log: ChunkLog
    celery: Celery
    blocks: BlockCache
    _hub: Hub | None = None
    _hub_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def hub(self) -> Hub:
        """The process's hub, created on first use (after gunicorn forked the worker)."""
        with self._hub_lock:
            if self._hub is None:
                self._hub = make_hub(
                    self.settings.log_redis_url or self.settings.redis_url,
                    self.log.redis,
                    queue_size=self.settings.viewer_queue_size,
                    check_interval_s=self.settings.hub_check_s,
                    stale_ms=self.settings.heartbeat_stale_s * 1000,
                    presence_ttl_s=self.log.running_ttl_s,
                    sharded=self.log.sharded,  # as the log's scripts publish
                )
                shutdown.on_begin(self._hub.wake_all)
            return self._hub


def init_app(app: Flask, settings: Settings) -> Runtime:
    engine = engine_from_settings(settings)
    # Relay's own data (RELAY_LOG_REDIS_URL, a cluster possibly); the broker is Celery's.
    client = make_client(
        settings.log_redis_url or settings.redis_url,
        settings.redis_max_connections,
        settings.redis_pool_wait_s,
    )
    celery = Celery("relay-web", set_as_current=False)
    celery.config_from_object("celeryconfig")
    celery.conf.broker_url, sentinel_options = broker_settings(settings.broker_url)
    celery.conf.broker_transport_options = {
        **celery.conf.broker_transport_options,
        **sentinel_options,
    }
    chunks = ChunkLog(
        client,
        retention_s=settings.log_retention_s,
        running_ttl_s=settings.running_log_ttl_s,
        sharded=settings.sharded(),
    )
    runtime = Runtime(
        settings=settings,
        engine=engine,
        sessions=make_sessionmaker(engine),
        log=chunks,
        celery=celery,
        blocks=BlockCache(chunks, block=settings.catchup_batch),
    )
    app.extensions["relay"] = runtime
    app.teardown_appcontext(_close_db)
    return runtime


def get_runtime() -> Runtime:
    runtime: Runtime = current_app.extensions["relay"]
    return runtime


def get_db() -> Session:
    """The request's SQL session, closed when the request ends."""
    if "db" not in g:
        g.db = get_runtime().sessions()
    db: Session = g.db
    return db


def _close_db(_exc: BaseException | None) -> None:
    """End the request's SQL session. The answer is already made: a database that went away
    meanwhile (a restart ends every backend, so the ROLLBACK that returns the connection to
    the pool fails) must not turn it into a 500. The connection is discarded, not pooled."""
    db = g.pop("db", None)
    if db is None:
        return
    try:
        db.close()
    except DBAPIError as exc:
        log.warning("the request's SQL connection was lost (%s): discarded", type(exc).__name__)
        with contextlib.suppress(DBAPIError):
            db.invalidate()
