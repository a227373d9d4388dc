"""Celery signal handlers: start the sweeper and metrics with the worker, turn revokes into
cancels, and begin the shutdown grace period."""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from celery.backends.base import DisabledBackend
from celery.signals import task_revoked, worker_ready, worker_shutting_down
from redis.exceptions import LockError

from models import keys, lifecycle
from models.lifecycle import Sweeper, SweepReport
from models.redisconn import OUTAGES
from models.sqlitewal import start_wal_checkpoints
from models.tables import Stream
from ops.gctune import freeze_startup_objects
from workers import waiting, webhooks
from workers.celery_app import app
from workers.runtime import WorkerRuntime, get_runtime

log = logging.getLogger("relay.worker")
_stop = threading.Event()
_announced: dict[str, int] = {}  # queue positions this worker published (workers/waiting.py)


@worker_ready.connect  # type: ignore[untyped-decorator]
def on_worker_ready(**_: Any) -> None:
    try:
        rt = get_runtime()
    except Exception:
        # A worker that cannot generate must not take tasks (they would sit half-started):
        # refuse to run, loudly, so the supervisor shows the failure.
        log.critical("relay worker cannot start: bad configuration", exc_info=True)
        os._exit(78)  # EX_CONFIG
    threading.Thread(target=sweep_forever, args=(rt,), name="relay-sweeper", daemon=True).start()
    if rt.settings.worker_metrics_port:
        try:
            rt.metrics.serve(rt.settings.worker_metrics_port)
        except OSError as exc:  # e.g. a second worker on the same machine and port
            log.warning("worker metrics not served on port %d: %s",
                        rt.settings.worker_metrics_port, exc)  # fmt: skip
    share_result_backend()
    start_wal_checkpoints(rt.settings.database_url)  # on SQLite: its syncs off the loop
    log.info("relay worker %s ready (generator=%s)", rt.worker_name, rt.generator.name)
    freeze_startup_objects()


def share_result_backend() -> None:
    """relay ignores task results (no ``result_backend``), yet Celery builds a result backend
    for each thread that runs a task, and under the gevent pool every task is a thread of its
    own: a DisabledBackend built for every answer (about 90 µs of the worker's CPU each, and
    a share of the work when many answers end at once). relay's tasks get the process's one;
    it holds no state. A configured backend keeps Celery's per-thread copies."""
    backend = app.backend
    if isinstance(backend, DisabledBackend):
        for name, task in app.tasks.items():
            if name.startswith("relay."):
                task.backend = backend


@worker_shutting_down.connect  # type: ignore[untyped-decorator]
def on_shutting_down(**_: Any) -> None:
    rt = get_runtime()
    rt.shutdown.begin()
    _stop.set()
    log.info("shutting down: generations get %.0fs, then move to another worker",
             rt.settings.shutdown_grace_s)  # fmt: skip


@task_revoked.connect  # type: ignore[untyped-decorator]
def on_task_revoked(request: Any = None, **_: Any) -> None:
    """A revoked task (queued, or terminated) ends its stream as cancelled."""
    args = getattr(request, "args", None) or []
    if not args:
        return
    rt = get_runtime()
    with rt.sessions() as db:
        stream = db.get(Stream, str(args[0]))
        if stream is not None:
            lifecycle.cancel(rt.log, db, stream, rt.settings.heartbeat_stale_s)


def sweep_forever(rt: WorkerRuntime) -> None:
    """Sweep every interval; a Redis lock lets one worker at a time do it."""
    sweeper = rt.sweeper()
    interval = rt.settings.sweep_interval_s
    down_since: float | None = None
    while not _stop.wait(interval):
        try:
            sweep_once(rt, sweeper, interval)
        except OUTAGES as exc:
            # An outage: one line when it starts, not a traceback every interval.
            if down_since is None:
                down_since = time.monotonic()
                first = str(exc).splitlines()[0][:200] if str(exc) else ""
                log.warning("sweep skipped: %s (%s); trying again every %.1fs",
                            type(exc).__name__, first, interval)  # fmt: skip
            continue
        except Exception:  # keep sweeping after anything else, loudly
            log.warning("sweep failed", exc_info=True)
            continue
        if down_since is not None:
            log.warning("sweeping again after %.1fs", time.monotonic() - down_since)
            down_since = None


def sweep_once(rt: WorkerRuntime, sweeper: Sweeper, interval: float) -> SweepReport | None:
    """Sweep if no other worker swept within the interval. The lock (owned by this worker
    only) expires just under one interval, so one worker sweeps per interval; a long pass
    extends it between batches, so passes never overlap."""
    lock = rt.log.redis.lock(keys.SWEEPER_LOCK, timeout=interval * 0.9, thread_local=False)
    if not lock.acquire(blocking=False, token=rt.worker_name):
        return None

    def keep_going() -> bool:
        try:
            return bool(lock.reacquire())
        except LockError:
            return False

    report = sweeper.sweep(keep_going)
    if keep_going():
        waiting.announce(rt, _announced)
    if rt.settings.webhook_url and keep_going():
        webhooks.send_due(rt, send_webhook)
    return report


def send_webhook(stream_id: str) -> None:
    from workers.celery_app import WEBHOOK, app

    app.send_task(WEBHOOK, args=[stream_id])
