"""Worker-side Prometheus metrics, served on RELAY_WORKER_METRICS_PORT when it is set."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from models import feed

DURATION_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
TTFC_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.chunks = Counter(
            "relay_chunks_appended", "Chunks appended to stream logs", registry=self.registry
        )
        self.generations = Counter(
            "relay_generations", "Generation attempts ended, by outcome", ["outcome"],
            registry=self.registry,
        )  # fmt: skip
        self.duration = Histogram(
            "relay_generation_duration_seconds", "Time from claim to the terminal event",
            ["outcome"], buckets=DURATION_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.ttfc = Histogram(
            "relay_time_to_first_chunk_seconds", "Time from claim to the first chunk appended",
            buckets=TTFC_BUCKETS, registry=self.registry,
        )  # fmt: skip

        self.abandoned_streams = Counter(
            "relay_streams_abandoned", "Answers cancelled by the detach policy (nobody watched)",
            registry=self.registry,
        )  # fmt: skip
        self.countdowns = Gauge(
            "relay_detach_countdowns",
            "Running answers with a cancel-after detach policy and no viewer attached",
            multiprocess_mode="livesum",
            registry=self.registry,
        )

        # Feed events this process could not write (models/feed.py counts them).
        self.registry.register(feed.WRITE_FAILURES)  # a new registry each time: no clash

    def abandoned(self) -> None:
        self.abandoned_streams.inc()

    def counting_down(self, delta: int) -> None:
        self.countdowns.inc(delta)

    def appended(self, n: int) -> None:
        """``n`` more chunks the log confirmed (reported in sums, see GroupAppender)."""
        self.chunks.inc(n)

    def finished(self, outcome: str, duration: float, ttfc: float | None) -> None:
        self.generations.labels(outcome).inc()
        self.duration.labels(outcome).observe(duration)
        if ttfc is not None:
            self.ttfc.observe(ttfc)

    def serve(self, port: int) -> None:
        start_http_server(port, addr="0.0.0.0", registry=self.registry)
