"""The worker's start-up hooks, in-process (workers/hooks.py)."""

from __future__ import annotations

import threading

from celery.backends.base import DisabledBackend

from workers import tasks
from workers.celery_app import app
from workers.hooks import share_result_backend


def backend_seen_by_a_new_thread() -> object:
    seen: list[object] = []
    thread = threading.Thread(target=lambda: seen.append(tasks.generate.backend))
    thread.start()
    thread.join()
    return seen[0]


def test_every_task_thread_uses_the_processs_one_result_backend() -> None:
    """Results are ignored, so the backend is Celery's DisabledBackend; without the hook a
    thread (under the gevent pool: every task) builds its own, about 90 µs an answer."""
    try:
        assert isinstance(app.backend, DisabledBackend)
        assert backend_seen_by_a_new_thread() is not app.backend  # Celery's default
        share_result_backend()
        assert backend_seen_by_a_new_thread() is app.backend
        assert tasks.notify.backend is app.backend
    finally:
        for task in (tasks.generate, tasks.notify):
            task.backend = None  # back to Celery's default for the other tests
