"""Turn the load generators' reports, the upstream's records and the meters into one result."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from bench.meter import cpu_totals
from bench.stats import per, r3, summarize

BAD_CLOSES = ("1011", "1013")


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Add up the reports of several load generator processes."""
    total: dict[str, Any] = collections.Counter()
    close_codes: collections.Counter[str] = collections.Counter()
    terminals: collections.Counter[str] = collections.Counter()
    shas: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    errors: list[str] = []
    for rep in reports:
        for key in ("viewers", "opened", "unique", "dup", "ooo", "foreign", "seq_gaps",
                    "seq_dups", "msgs", "complete", "closed", "n_errors", "deflate"):  # fmt: skip
            total[key] += rep.get(key, 0)
        close_codes.update(rep["close_codes"])
        terminals.update(rep["terminals"])
        for s, counts in rep["sha_by_stream"].items():
            shas[s].update(counts)
        errors += rep["errors"]
    return {**total, "close_codes": dict(close_codes), "terminals": dict(terminals),
            "sha_by_stream": shas, "errors": errors[:5],
            "last_recv_us": max((r["last_recv_us"] for r in reports), default=0)}  # fmt: skip


def load_latencies(reports: list[dict[str, Any]], key: str = "lat_file") -> np.ndarray:
    """Return every latency sample of the reports, in milliseconds."""
    arrays = [np.load(r[key]) for r in reports if r.get(key)]
    if not arrays:
        return np.zeros(0)
    return np.concatenate(arrays).astype(float) / 1000.0


def delivery(merged: dict[str, Any], up: dict[str, Any], per_stream: int) -> dict[str, Any]:
    """Count lost, duplicated and out-of-order chunks against what the upstream produced."""
    streams = up["streams"]
    expected = sum(rec["produced"] for rec in streams.values()) * per_stream
    exact = sum(merged["sha_by_stream"].get(s, {}).get(rec["sha256"], 0)
                for s, rec in streams.items())  # fmt: skip
    bad_closes = sum(merged["close_codes"].get(c, 0) for c in BAD_CLOSES)
    return {
        "viewers": merged["viewers"],
        "chunks_produced": up["produced"],
        "chunks_expected_at_viewers": expected,
        "chunks_received": merged["unique"],
        "lost": expected - merged["unique"],
        "duplicated": merged["dup"],
        "out_of_order": merged["ooo"],
        "foreign": merged["foreign"],
        "seq_gaps": merged["seq_gaps"],
        "seq_duplicates": merged["seq_dups"],
        "viewers_complete": merged["complete"],
        "every_viewer_got_every_chunk": merged["complete"] == merged["viewers"]
        and expected == merged["unique"],
        "viewers_text_exact": exact,
        "viewers_closed": merged["closed"],
        "viewer_errors": merged["n_errors"] + bad_closes,
        "close_codes": merged["close_codes"],
        "terminal_events": merged["terminals"],
        "error_samples": merged["errors"],
        "messages_received": merged["msgs"],
        "viewers_with_deflate": merged["deflate"],
    }


def throughput(res: dict[str, Any], go_us: int, last_us: int, rate: float, streams: int) -> None:
    """Add chunks/s and deliveries/s over the span from go to the last chunk received."""
    span = (last_us - go_us) / 1e6 if last_us > go_us else None
    res["first_go_to_last_receive_s"] = r3(span)
    if span:
        res["end_to_end_chunks_per_s"] = round(res["chunks_received"] / span)
        res["deliveries_per_s"] = res["end_to_end_chunks_per_s"]
        res["produced_chunks_per_s"] = round(res["chunks_produced"] / span)
    if rate > 0:
        res["requested_chunks_per_s"] = round(rate * streams)


def cpu(res: dict[str, Any], meter: dict[str, Any], redis: dict[str, Any] | None) -> None:
    """Add CPU per process, relay's CPU (web + worker + Redis) and chunks per CPU-second."""
    res["processes"] = meter["procs"]
    res["measured_span_s"] = meter["span_s"]
    res["other_processes_cpu_pct"] = meter["others_cpu_pct"]
    totals = cpu_totals(meter["procs"], redis["cpu_s"] if redis else None)
    res.update(totals)
    got, made = res.get("chunks_received"), res.get("chunks_produced")
    res["deliveries_per_relay_cpu_s"] = per(got, totals["relay_cpu_s"])
    res["chunks_per_relay_cpu_s"] = per(made, totals["relay_cpu_s"])
    res["deliveries_per_all_cpu_s"] = per(got, totals["all_cpu_s"])
    res["chunks_per_all_cpu_s"] = per(made, totals["all_cpu_s"])
    if got:
        res["relay_cpu_us_per_delivery"] = r3(1e6 * totals["relay_cpu_s"] / got)
    if redis is not None:
        res["redis"] = redis


def latency(res: dict[str, Any], lat_ms: np.ndarray, first_ms: np.ndarray) -> None:
    """Add the latency summaries (every chunk, and each viewer's first chunk)."""
    res["latency_ms"] = summarize(lat_ms)
    res["first_chunk_latency_ms"] = summarize(first_ms)
