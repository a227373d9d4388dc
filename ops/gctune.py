"""Garbage-collector settings for relay's long-running processes.

A full (generation 2) collection walks every tracked object. In a web or worker process that
is hundreds of thousands of objects created at start-up (Flask, SQLAlchemy, Celery, the
OpenAI client, ...), so each full collection paused every stream of the process for 20 to 150
ms (measured on the latency benchmark: the largest share of its p99). ``gc.freeze()`` moves
what exists once the process is ready into a permanent generation that collections skip, and
higher thresholds make the young collections, and the promotions that lead to full ones,
rarer: nearly every object relay creates per chunk is freed by reference counting, not by
the collector. Cycles are still collected.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger("relay.gc")
# CPython's defaults are (700, 10, 10).
THRESHOLDS = (10_000, 50, 100)


def freeze_startup_objects() -> None:
    """Call once the process has loaded everything it needs and is about to serve."""
    gc.collect()  # what start-up left as garbage goes now, not into the frozen generation
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    log.info("gc: %d start-up objects frozen", gc.get_freeze_count())
