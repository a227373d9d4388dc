"""Celery signal handlers: start the sweeper and metrics with the worker, turn revokes into
cancels, and begin the shutdown grace period."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery.signals import task_revoked, worker_ready, worker_shutting_down

from models import keys, lifecycle
from models.tables import Stream
from ops.gctune import freeze_startup_objects
from workers.runtime import WorkerRuntime, get_runtime

log = logging.getLogger("relay.worker")
_stop = threading.Event()


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
    log.info("relay worker %s ready (generator=%s)", rt.worker_name, rt.generator.name)
    freeze_startup_objects()


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
    while not _stop.wait(interval):
        try:
            if rt.log.redis.set(keys.SWEEPER_LOCK, rt.worker_name, nx=True, px=int(interval * 900)):
                sweeper.sweep()
        except Exception:  # keep sweeping after a database or Redis blip
            log.warning("sweep failed", exc_info=True)
