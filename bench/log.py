"""Chunk-log micro-benchmarks: append rate through the fencing script, catch-up read rate,
and Redis memory per chunk (for retention sizing).

Run by ``python -m bench log`` with the code under test's own interpreter
(``python bench/log.py <redis url>`` from that checkout's root); prints one JSON object."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import redis

from models import keys
from models.chunklog import ChunkLog
from models.events import CHUNK, DONE, Event
from workers.generators.demo import chunk, compose


def sample_chunks(n: int) -> list[str]:
    """Token-sized pieces of realistic answer text (what the demo generator writes)."""
    text = compose("benchmark the resumable chunk log in redis", "bench", n)
    return chunk(text, "bench")[:n]


def append_rate(log: ChunkLog, pieces: list[str]) -> dict[str, Any]:
    sid = "bench-append"
    log.init(sid)
    claim = log.claim(sid, "bench", 60)
    started = time.perf_counter()
    for seq, piece in enumerate(pieces, start=1):
        log.append(sid, claim.attempt, Event(seq, CHUNK, text=piece))
    elapsed = time.perf_counter() - started
    log.append(sid, claim.attempt, Event(len(pieces) + 1, DONE, message_id="m"))
    return {
        "chunks": len(pieces),
        "seconds": round(elapsed, 3),
        "chunks_per_second": round(len(pieces) / elapsed),
        "mean_append_ms": round(elapsed / len(pieces) * 1000, 4),
    }


def catchup_rate(log: ChunkLog, batch: int) -> dict[str, Any]:
    sid = "bench-append"
    started = time.perf_counter()
    count = sum(1 for _ in log.iter_from(sid, 0, batch))
    elapsed = time.perf_counter() - started
    return {"events": count, "batch": batch, "events_per_second": round(count / elapsed)}


def memory_per_chunk(client: redis.Redis, pieces: list[str]) -> dict[str, Any]:
    log = ChunkLog(client)
    sid = "bench-memory"
    log.init(sid)
    claim = log.claim(sid, "bench", 60)
    for seq, piece in enumerate(pieces, start=1):
        log.append(sid, claim.attempt, Event(seq, CHUNK, text=piece))
    log_bytes = int(client.memory_usage(keys.log_key(sid), samples=0) or 0)
    state_bytes = int(client.memory_usage(keys.state_key(sid), samples=0) or 0)
    text_bytes = sum(len(p.encode()) for p in pieces)
    return {
        "chunks": len(pieces),
        "mean_chunk_text_bytes": round(text_bytes / len(pieces), 2),
        "log_bytes": log_bytes,
        "bytes_per_chunk": round(log_bytes / len(pieces), 1),
        "state_hash_bytes": state_bytes,
    }


def run(url: str) -> dict[str, Any]:
    client = redis.Redis.from_url(url, decode_responses=True)
    log = ChunkLog(client)
    pieces = sample_chunks(5000)
    result = {
        "append": append_rate(log, pieces),
        "catchup": catchup_rate(log, 500),
        "memory": memory_per_chunk(client, sample_chunks(2000)),
    }
    # Only this benchmark's keys: the Redis may not be ours to flush.
    for sid in ("bench-append", "bench-memory"):
        client.delete(keys.log_key(sid), keys.state_key(sid))
    client.close()
    return result


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1])))
