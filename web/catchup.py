"""Catch-up reads, shared by every viewer of a web process.

The log is read in aligned blocks of ``block`` events (seqs kB+1 .. (k+1)B). A full block
never changes while its log exists (entries are only ever added after the last one), so it
is read from Redis once, kept with its encodings (JSON, WebSocket frames, deflate) for
``ttl_s``, and sent as is to every viewer that catches up through it: a hundred viewers
re-attaching to the same long answer after a web restart cost one read and one encoding.
The last block of an ended answer (one that ends with its terminal event) is kept the same
way: what it holds never changes either. An admin retry may continue the stream after the
terminal event, in the same block; a kept copy then lacks only what follows the terminal
event, and a viewer always reads from Redis what follows a terminal event before it ends.
Viewers that ask for the same block at the same moment share reads: at most one read of a
block is in flight, and everyone who asks meanwhile waits for the next one, which starts
after they asked, so its answer is as fresh as their own read would have been (this matters
for a block that is not full yet, the live end of a stream: it may still grow, so it is
never kept, but a thousand viewers flagged at once still cost two reads, not a thousand).
The cache is bounded in bytes, oldest first out. A read from the middle of a block, the
question whether a stream's log still exists and a queued stream's place in line are shared
the same way (never kept): a thousand viewers of an ended answer arriving together ask Redis
each thing about twice, not a thousand times, and do not each take a connection from the
pool to ask it.

The TTL bounds the one case where a kept block could go wrong: Redis lost a log and a new
attempt wrote different text at the same seqs.

A finished stream whose log has expired is rebuilt from SQL, all of it at once; that replay
is shared the same way (``replay``): a thousand viewers attaching to an old answer cost one
query and one encoding instead of a thousand, which kept the event loop busy for tens of
seconds and left the viewers' Redis checkouts waiting behind it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from models.chunklog import ChunkLog
from models.events import TERMINAL_TYPES
from web.frames import Batch

T = TypeVar("T")
# (stream, what): a block's index (0, 1, ...), or one of the kinds below.
Key = tuple[str, int | str]
# What a shared read returns: the batch, and whether it may be kept for later readers.
Loader = Callable[[], tuple[Batch | None, bool]]
REPLAY = "replay"  # a stream's SQL replay
EXISTS = "exists"  # whether its log exists
PLACE = "place"  # a queued stream's place in line


@dataclass
class _Kept:
    batch: Batch
    expires: float
    size: int


@dataclass
class _Flight:
    """One read of a block, shared by whoever asked before it took off."""

    done: threading.Event
    value: Any = None  # what the read returned
    error: BaseException | None = None


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
        self._flying: dict[Key, _Flight] = {}  # the read in flight
        self._boarding: dict[Key, _Flight] = {}  # the next one, taking whoever asks meanwhile
        self._waiting = 0  # callers waiting for a read in flight
        self._lock = threading.Lock()

    def read(self, stream_id: str, after: int) -> Batch | None:
        """The events after ``after`` up to the end of its block that the log has now."""
        index, offset = divmod(after, self.block)
        if offset:  # mid-block: the rest of it, shared by who asks at once but never kept
            last = (index + 1) * self.block
            return self._shared(
                (stream_id, f"after {after}"), lambda: (self._read(stream_id, after, last), False)
            )

        def load() -> tuple[Batch | None, bool]:
            batch = self._read(stream_id, after, after + self.block)
            keep = batch is not None and (
                len(batch) == self.block or batch.types[-1] in TERMINAL_TYPES
            )
            return batch, keep

        return self._shared((stream_id, index), load)

    def kept(self, stream_id: str, after: int) -> Batch | None:
        """The block that starts after ``after`` (a block boundary) if this process keeps
        it; never a read."""
        with self._lock:
            return self._get((stream_id, after // self.block)) if after % self.block == 0 else None

    def holds_end(self, stream_id: str, after: int) -> bool:
        """Whether the blocks this process keeps hold the stream from ``after`` (a block
        boundary) through its terminal event: a viewer from there needs nothing from Redis
        before that event, not even whether the log still exists (what it sends is what the
        log held, which never changes, and what SQL would replay)."""
        if after % self.block:
            return False
        index = after // self.block
        with self._lock:
            while (batch := self._get((stream_id, index))) is not None:
                if batch.types[-1] in TERMINAL_TYPES:
                    return True
                index += 1
        return False

    def place(self, stream_id: str) -> tuple[int, str] | None:
        """``ChunkLog.queue_place`` (shared by who asks at once, never kept)."""
        return self._shared((stream_id, PLACE), lambda: (self.log.queue_place(stream_id), False))

    def exists(self, stream_id: str) -> bool:
        """Whether the stream's log exists now (shared by who asks at once, never kept)."""
        return self._shared((stream_id, EXISTS), lambda: (self.log.exists(stream_id), False))

    def replay(self, stream_id: str, load: Loader) -> Batch | None:
        """A stream as ``load`` rebuilds it from SQL (its log expired), shared like a full
        block; ``load`` says whether it may be kept (only once SQL has the stream ended)."""
        return self._shared((stream_id, REPLAY), load)

    def _shared(self, key: Key, load: Callable[[], tuple[T, bool]]) -> T:
        """``load``'s answer, from the cache, from a read in flight, or read now. Only
        batches are ever kept (``load`` says when)."""
        with self._lock:
            kept = self._get(key)
            if kept is not None:
                return cast(T, kept)
            flight, ahead = self._board(key)
            if ahead is not None:
                self._waiting += 1
        if ahead is not None:
            try:
                ahead.done.wait()
                with self._lock:
                    kept = self._get(key)
                    if kept is not None:  # it was kept (a full block): nothing newer to read
                        return cast(T, kept)
                    leads = self._boarding.get(key) is flight and key not in self._flying
                    if leads:  # the first passenger to notice flies the next read
                        del self._boarding[key]
                        self._flying[key] = flight
                if not leads:
                    return cast(T, self._arrive(flight))
            finally:
                with self._lock:
                    self._waiting -= 1
        return self._fly(key, flight, load)

    def _board(self, key: Key) -> tuple[_Flight, _Flight | None]:
        """The flight to take (with the lock held): the one in the air is too old for a new
        passenger, so a read in flight means waiting for the next."""
        ahead = self._flying.get(key)
        if ahead is None:  # nothing in the air: take off now, with whoever boarded
            flight = self._boarding.pop(key, None) or _Flight(threading.Event())
            self._flying[key] = flight
            return flight, None
        flight = self._boarding.get(key) or self._boarding.setdefault(
            key, _Flight(threading.Event())
        )
        return flight, ahead

    def _fly(self, key: Key, flight: _Flight, load: Callable[[], tuple[T, bool]]) -> T:
        try:
            value, keep = load()
            flight.value = value
            if isinstance(value, Batch) and keep:
                self._keep(key, value)
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._flying[key]
            flight.done.set()
        return value

    @staticmethod
    def _arrive(flight: _Flight) -> Any:
        flight.done.wait()
        if flight.error is not None:
            raise flight.error
        return flight.value

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
        """Blocks and bytes kept; reads in flight and the callers waiting for one."""
        with self._lock:
            return {
                "blocks": len(self._kept),
                "bytes": self._bytes,
                "reading": len(self._flying),
                "waiting": self._waiting,
            }
