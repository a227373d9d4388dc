"""Celery tasks: thin wrappers that take a stream ID and call plain functions."""

from __future__ import annotations

from celery import Task

from workers.celery_app import GENERATE, app
from workers.generation import run_generation
from workers.runtime import get_runtime


@app.task(name=GENERATE, bind=True)  # type: ignore[untyped-decorator]
def generate(self: Task, stream_id: str) -> str:
    """Generate (or continue) the answer for ``stream_id``."""
    return run_generation(get_runtime(), stream_id, self.request.id)
