"""Percentile summaries computed exactly as the peer's harness does, so figures compare 1:1."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np


def now_us() -> int:
    """Return CLOCK_MONOTONIC in microseconds (the clock every process on the host shares)."""
    return time.monotonic_ns() // 1000


def r3(x: float | None) -> float | None:
    """Round to three decimals, keeping None (and NaN as None)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return round(float(x), 3)


def _pct(sorted_values: np.ndarray, p: float) -> float:
    # The peer's definition: the value at index ceil(p/100 * n) - 1 of the sorted sample.
    n = len(sorted_values)
    i = min(n - 1, max(0, math.ceil(p / 100 * n) - 1))
    return float(sorted_values[i])


def summarize(values: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Summarize a sample: n, p50/p90/p99/p999, max, min and mean."""
    a = np.sort(np.asarray(values, dtype=float))
    if not len(a):
        return {"n": 0}
    return {
        "n": len(a),
        "p50": r3(_pct(a, 50)),
        "p90": r3(_pct(a, 90)),
        "p99": r3(_pct(a, 99)),
        "p999": r3(_pct(a, 99.9)),
        "max": r3(float(a[-1])),
        "min": r3(float(a[0])),
        "mean": r3(float(a.mean())),
    }


def ratio(relay: float | None, peer: float | None) -> float | None:
    """Return relay / peer, or None when either is missing or the peer's figure is zero."""
    if relay is None or peer is None or peer == 0:
        return None
    return round(relay / peer, 3)


def per(amount: float | None, cpu_s: float | None) -> float | None:
    """Return amount per CPU-second (None when there was no CPU time to divide by)."""
    if amount is None or not cpu_s:
        return None
    return round(amount / cpu_s, 1)
