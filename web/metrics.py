"""Web-side Prometheus metrics at /metrics, and the /readyz check.

Each gunicorn worker process counts its own; with PROMETHEUS_MULTIPROC_DIR set (``make run``
sets it) /metrics adds up all processes of this server.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from flask import Flask, Response, jsonify
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text

from models.tables import Stream
from web.runtime import Runtime, get_runtime


class StreamsByStatus(Collector):
    """relay_streams{status}: counted in SQL at scrape time (an indexed GROUP BY)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("relay_streams", "Streams by status", labels=["status"])
        with self.runtime.sessions() as db:
            rows = db.execute(select(Stream.status, func.count()).group_by(Stream.status))
            for status, count in rows.tuples():
                family.add_metric([status], count)
        yield family


def init_app(app: Flask) -> None:
    @app.get("/metrics")
    def metrics() -> Response:
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


def _check_db(rt: Runtime) -> str:
    def probe() -> None:
        with rt.sessions() as db:
            db.execute(text("SELECT 1"))

    return _check(probe)
