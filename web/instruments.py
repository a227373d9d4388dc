"""The web tier's Prometheus instruments (exposed by web.metrics at /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ATTACHES = Counter(
    "relay_attaches", "Viewers attached, by transport and whether they resumed (after > 0)",
    ["transport", "kind"],
)  # fmt: skip
VIEWERS = Gauge(
    "relay_viewers_connected", "Viewers attached right now", ["transport"],
    multiprocess_mode="livesum",
)  # fmt: skip
CATCHUP = Histogram(
    "relay_catchup_events", "Events sent from the log before the live tail, per attach",
    buckets=(0, 1, 10, 50, 100, 500, 1000, 5000, 20000),
)  # fmt: skip
HUB_DISPATCH = Histogram(
    "relay_hub_dispatch_seconds", "Time from the hub's XREAD returning to every viewer's queue "
    "holding the entries (the hub's own lag)",
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1),
)  # fmt: skip
HUB_LAGGED = Counter(
    "relay_hub_lagged", "Viewers whose queue was full, so they fell back to reading the log"
)
