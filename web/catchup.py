"""Catch-up reads, shared by every viewer of a web process.

The log is read in aligned blocks of ``block`` events (seqs kB+1 .. (k+1)B). A full block
never changes while its log exists (entries are only ever added after the last one), so it
is read from Redis once, kept with its encodings (JSON, WebSocket frames, deflate) for
``ttl_s``, and sent as is to every viewer that catches up through it: a hundred viewers
re-attaching to the same long answer after a web restart cost one read and one encoding.
Viewers that ask for the same block at the same moment wait for one read (single flight).
A block that is not full yet (the live end of a stream) is read for each caller and not
kept. The cache is bounded in bytes, oldest first out.

The TTL bounds the one case where a kept block could go wrong: Redis lost a log and a new
attempt wrote different text at the same seqs.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from models.chunklog import ChunkLog
from web.frames import Batch

Key = tuple[str, int]


@dataclass
class _Kept:
    batch: Batch
    expires: float
    size: int


class BlockCache:
    """Aligned catch-up blocks of many streams' logs, read once per process."""

    def __init__(
        self, log: ChunkLog, *, block: int = 500, ttl_s: float = 30.0, max_bytes: int = 64 << 20
    ) -> None:
        self.log = log
        self.block = block
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._kept: OrderedDict[Key, _Kept] = OrderedDict()
        self._bytes = 0
        self._reading: dict[Key, threading.Event] = {}
        self._lock = threading.Lock()

    def read(self, stream_id: str, after: int) -> Batch | None:
        """The events after ``after`` up to the end of its block that the log has now."""
        index = after // self.block
        if after % self.block:  # mid-block: read just the rest, nothing to share
            return self._read(stream_id, after, (index + 1) * self.block)
        key = (stream_id, index)
        while True:
            with self._lock:
                kept = self._get(key)
                if kept is not None:
                    return kept
                reading = self._reading.get(key)
                if reading is None:
                    self._reading[key] = threading.Event()
                    break
            reading.wait(10.0)  # another viewer is reading this block: share its read
        try:
            batch = self._read(stream_id, after, after + self.block)
            if batch is not None and len(batch) == self.block:
                self._keep(key, batch)
            return batch
        finally:
            with self._lock:
                self._reading.pop(key).set()

    def _read(self, stream_id: str, after: int, last: int) -> Batch | None:
        types, datas = self.log.read_columns(stream_id, after, last)
        return Batch(after + 1, types, datas) if types else None

    def _get(self, key: Key) -> Batch | None:
        kept = self._kept.get(key)
        if kept is None:
            return None
        if kept.expires < time.monotonic():
            self._drop(key)
            return None
        self._kept.move_to_end(key)
        return kept.batch

    def _keep(self, key: Key, batch: Batch) -> None:
        size = batch.nbytes()
        with self._lock:
            if key in self._kept:
                return
            self._kept[key] = _Kept(batch, time.monotonic() + self.ttl_s, size)
            self._bytes += size
            while self._bytes > self.max_bytes and self._kept:
                self._drop(next(iter(self._kept)))

    def _drop(self, key: Key) -> None:
        self._bytes -= self._kept.pop(key).size

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"blocks": len(self._kept), "bytes": self._bytes}
