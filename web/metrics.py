"""Web-side Prometheus metrics at /metrics, and the /readyz check.

Each gunicorn worker process counts its own; with PROMETHEUS_MULTIPROC_DIR set (``make run``
sets it) /metrics adds up all processes of this server.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterator

from flask import Flask, Response, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text

from models.events import ABANDONED
from models.exceptions import Unauthorized
from models.tables import ACTIVE_STREAM_STATUSES, Stream
from web.runtime import Runtime, get_runtime


class StreamsByStatus(Collector):
    """relay_streams{status}, and the detach policy's relay_streams_abandoned and
    relay_streams_cancel_after: counted in SQL at scrape time (on the status index)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("relay_streams", "Streams by status", labels=["status"])
        with self.runtime.sessions() as db:
            rows = db.execute(select(Stream.status, func.count()).group_by(Stream.status))
            for status, count in rows.tuples():
                family.add_metric([status], count)
            abandoned = db.scalar(
                select(func.count()).where(
                    Stream.status == "cancelled", Stream.end_reason == ABANDONED
                )
            )
            policed = db.scalar(
                select(func.count()).where(
                    Stream.status.in_(ACTIVE_STREAM_STATUSES), Stream.detach_after_s.is_not(None)
                )
            )
        yield family
        yield GaugeMetricFamily(
            "relay_streams_abandoned",
            "Answers cancelled by their detach policy (nobody watched), kept in SQL",
            value=abandoned or 0,
        )
        yield GaugeMetricFamily(
            "relay_streams_cancel_after",
            "Queued or running answers under a cancel-after detach policy",
            value=policed or 0,
        )


def init_app(app: Flask) -> None:
    @app.get("/metrics")
    def metrics() -> Response:
        _check_metrics_token(get_runtime().settings.metrics_token)
        registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            from prometheus_client import REGISTRY

            registry = REGISTRY
        body = generate_latest(registry)
        body += generate_latest(_streams_registry(get_runtime()))
        return Response(body, mimetype=CONTENT_TYPE_LATEST)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    @app.get("/readyz")
    def readyz() -> tuple[Response, int]:
        rt = get_runtime()
        checks = {"redis": _check(lambda: rt.log.redis.ping()), "database": _check_db(rt)}
        if rt.settings.broker_url != rt.settings.log_redis_url:
            # The task queue is a Redis of its own (CELERY_BROKER_URL, or the logs moved to
            # RELAY_LOG_REDIS_URL): posts need it too.
            checks["broker"] = _check(lambda: _ping_broker(rt))
        ready = all(v == "ok" for v in checks.values())
        return jsonify(status="ok" if ready else "unavailable", checks=checks), (
            200 if ready else 503
        )


def _streams_registry(rt: Runtime) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StreamsByStatus(rt))
    return registry


def _check(probe: object) -> str:
    try:
        probe()  # type: ignore[operator]
    except Exception as exc:
        return f"error: {type(exc).__name__}"
    return "ok"


def _ping_broker(rt: Runtime) -> None:
    """One PING on a connection of the web's Celery producer pool (kombu's Redis or
    Sentinel transport)."""
    with rt.celery.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)
        conn.default_channel.client.ping()


def _check_db(rt: Runtime) -> str:
    def probe() -> None:
        with rt.sessions() as db:
            db.execute(text("SELECT 1"))

    return _check(probe)


def _check_metrics_token(token: str) -> None:
    """With RELAY_METRICS_TOKEN set, /metrics answers only ``Authorization: Bearer <it>``."""
    if not token:
        return
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise Unauthorized("/metrics needs Authorization: Bearer <RELAY_METRICS_TOKEN>")
