"""The PNG of a workload: latency distributions as a CDF and a tail plot, both log-scaled,
with the peer's percentiles on the same axes when the peer ran."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

# Probabilities at which to draw each curve: even in the body, denser toward the tail.
_GRID = np.unique(np.concatenate([np.linspace(0, 0.99, 600), 1 - np.logspace(-2, -6, 300), [1]]))
_PEER_P = (("min", 0.0), ("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p999", 0.999), ("max", 1.0))
LABELS = {"latency": "ms, producer write → viewer receipt",
          "catchup": "ms, connect → last chunk (live) or done (finished)",
          "dispatch": "ms", "idle": "ms, producer write → viewer receipt"}  # fmt: skip


def _curve(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(values, dtype=float)
    a = a[np.isfinite(a)]
    grid = _GRID[_GRID <= 1]
    return np.quantile(a, grid), grid


def _peer_points(name: str, peer: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    summary = peer.get("summary") or {}
    if name == "catchup":
        n = summary.get("concurrent_readers")
        return [("peer, 1 viewer", summary.get("single_ms") or {}),
                (f"peer, {n} at once", summary.get("concurrent_ms") or {})]  # fmt: skip
    return [("peer (resumable-stream)", summary.get("latency_ms") or {})]


def _draw_peer(cdf: Axes, tail: Axes, name: str, peer: dict[str, Any]) -> None:
    for (label, pct), marker in zip(_peer_points(name, peer), ("D", "s"), strict=False):
        # Percentiles finer than the sample (p99.9 of 100 values) would only repeat the max.
        finest = 1 - 1 / max(1, pct.get("n") or 1)
        pts = [(pct[k], p) for k, p in _PEER_P
               if pct.get(k) is not None and pct[k] > 0 and (p <= finest or p == 1)]  # fmt: skip
        if not pts:
            continue
        xs, ps = zip(*pts, strict=True)
        cdf.plot(xs, ps, marker=marker, linestyle=":", color="black", label=label)
        tail_pts = [(x, 1 - p) for x, p in pts if p < 1]
        if tail_pts:
            tx, ty = zip(*tail_pts, strict=True)
            tail.plot(tx, ty, marker=marker, linestyle=":", color="black", label=label)


def _title(name: str, out: dict[str, Any]) -> str:
    commit = out.get("relay", {}).get("commit", "?")
    cfg = out.get("config", {})
    brief = ", ".join(f"{k}={v}" for k, v in cfg.items() if isinstance(v, int | float | str))
    return f"{name} — relay {commit}\n{brief[:150]}"


def render(name: str, out: dict[str, Any], arrays: dict[str, np.ndarray], path: Path) -> None:
    """Draw the relay samples (and the peer's percentiles) to ``path``; nothing if no samples."""
    arrays = {k: v for k, v in arrays.items() if len(v)}
    if not arrays:
        return
    fig, (cdf, tail) = plt.subplots(1, 2, figsize=(13, 5))
    for label, values in arrays.items():
        x, p = _curve(values)
        x = np.maximum(x, 1e-3)  # log axes cannot show zero
        relay_label = f"relay: {label}" if len(arrays) > 1 else "relay"
        cdf.plot(x, p, label=relay_label)
        keep = p < 1 - 0.5 / len(values)  # beyond the sample's resolution the tail says nothing
        tail.plot(x[keep], 1 - p[keep], label=relay_label)
    _draw_peer(cdf, tail, name, out.get("peer", {}))
    xlabel = LABELS.get(name, LABELS["latency"])
    cdf.set(xscale="log", xlabel=xlabel, ylabel="fraction ≤ x", ylim=(0, 1.01), title="CDF")
    tail.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="fraction > x",
             title="tail (1 - CDF)")  # fmt: skip
    for ax in (cdf, tail):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(_title(name, out), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
