"""Celery tasks: thin wrappers that take a stream ID and call plain functions."""

from __future__ import annotations

from celery import Task
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import OperationalError

from workers.celery_app import GENERATE, app
from workers.generation import run_generation
from workers.runtime import get_runtime


# A database or Redis outage before the stream is claimed: retry the same task (same id, so
# a revoke still applies) with backoff rather than leave the stream queued until the sweeper.
@app.task(  # type: ignore[untyped-decorator]
    name=GENERATE,
    bind=True,
    autoretry_for=(OperationalError, RedisConnectionError),
    retry_backoff=2,
    retry_backoff_max=30,
    max_retries=20,
)
def generate(self: Task, stream_id: str) -> str:
    """Generate (or continue) the answer for ``stream_id``."""
    return run_generation(get_runtime(), stream_id, self.request.id)
