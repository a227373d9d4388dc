"""What a worker process needs: SQL sessions, the chunk log and the generator, built once."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sqlalchemy.orm import Session, sessionmaker

from models.chunklog import ChunkLog
from models.db import make_engine, make_sessionmaker
from models.redisconn import make_redis
from models.settings import Settings
from workers.generators import Generator, make_generator


@dataclass
class WorkerRuntime:
    settings: Settings
    sessions: sessionmaker[Session]
    log: ChunkLog
    generator: Generator


def build_runtime(settings: Settings) -> WorkerRuntime:
    client = make_redis(settings.redis_url, settings.redis_max_connections)
    return WorkerRuntime(
        settings=settings,
        sessions=make_sessionmaker(make_engine(settings.database_url)),
        log=ChunkLog(
            client,
            retention_s=settings.log_retention_s,
            running_ttl_s=settings.running_log_ttl_s,
        ),
        generator=make_generator(settings),
    )


@functools.cache
def get_runtime() -> WorkerRuntime:
    """The process's runtime, built on first use (after the worker forked)."""
    return build_runtime(Settings.from_env())
