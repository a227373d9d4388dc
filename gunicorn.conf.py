"""Gunicorn settings for relay's web tier (``gunicorn -c gunicorn.conf.py 'web:create_app()'``).

Command-line flags override these (the tests pass their own --bind and --workers).
"""

import os
import signal
from typing import Any

# gevent: one process holds thousands of mostly idle WebSocket/SSE connections.
worker_class = "gevent"
# The default (1,000) is far below what one gevent process can hold for idle viewers.
worker_connections = int(os.environ.get("WEB_WORKER_CONNECTIONS", "10000"))
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Loopback unless HOST says otherwise (HOST=0.0.0.0 in a container or behind a proxy on
# another machine): guest chats and /metrics are not for the whole network by default.
bind = [f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"]
# On SIGTERM, sockets are closed with 1001 "going away" at once (see post_worker_init);
# this is how long the rest (plain HTTP requests) get to finish.
graceful_timeout = 10
# Long-lived streams are not "hung requests"; the gevent worker does not apply this to them,
# but keep it generous for synchronous start-up work.
timeout = 60
accesslog = "-"
# How long a new connection may wait for its first request to be read. The gevent worker
# closes it silently after this; a burst of a thousand viewers attaching at once kept the
# event loop busy past the default 2 s, and hundreds of handshakes were dropped unanswered.
keepalive = 30


def post_worker_init(worker: Any) -> None:
    """Tell open streams the process is going away before gunicorn stops accepting, answer
    gunicorn's own refusals (414, 431, 400) as JSON (ops/httperrors.py), keep the start-up
    objects out of garbage collections (ops/gctune.py), let redis-py's readiness checks skip
    the event loop (ops/geventfix.py), connect the hub, and on SQLite keep the WAL's
    checkpoints off the event loop (models/sqlitewal.py)."""
    from ops.geventfix import readiness_checks_without_yield
    from ops.httperrors import install

    install()
    readiness_checks_without_yield()
    original = worker.handle_exit

    def handle_exit(sig: int, frame: Any) -> None:
        from web.shutdown import begin

        begin()
        original(sig, frame)

    worker.handle_exit = handle_exit
    signal.signal(signal.SIGTERM, handle_exit)

    from ops.gctune import freeze_startup_objects

    freeze_startup_objects()

    # The hub (the process's pub/sub connection) connects before the first viewer comes.
    runtime = getattr(worker, "wsgi", None) and worker.wsgi.extensions.get("relay")
    if runtime is not None:
        runtime.hub.start()
        from models.sqlitewal import start_wal_checkpoints

        start_wal_checkpoints(runtime.settings.database_url)


def child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauges (viewers connected) from the multiprocess metrics."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
