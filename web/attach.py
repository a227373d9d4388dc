"""Attach a viewer to a stream: catch-up from the log, then the live tail through the hub.

``follow`` yields the events with ``seq > after`` exactly once each, in order, ending with the
terminal event, as batches of consecutive events (a catch-up read, or what one append
published). It never waits: when it has nothing to send it yields ``None``, and the caller
waits until ``wake`` is set (or its own idle tick, or parks the viewer) before resuming it.
It never yields a duplicate or skips a seq: every batch from the hub is cut at the viewer's
cursor, and any gap is filled from the log.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import store
from models.chunklog import ChunkLog, LogState
from models.events import TERMINAL_TYPES, Event
from models.tables import TERMINAL_STREAM_STATUSES, Message, Stream
from web.catchup import BlockCache
from web.frames import Batch, Notice
from web.hub import DirectWrite, Hub, Subscription
from web.instruments import CATCHUP

# What a viewer is given: batches of events, queue notices, and None (nothing now: wait).
Followed = Generator[Batch | Notice | None, None, None]
# Drain result: (new cursor, whether the terminal event was yielded).
Drain = Generator[Batch, None, tuple[int, bool]]


@dataclass(frozen=True)
class Snapshot:
    """What SQL says about a stream, enough to replay it once the log has expired."""

    stream: Stream
    content: str

    @property
    def finished(self) -> bool:
        return self.stream.status in TERMINAL_STREAM_STATUSES

    def events(self, after: int) -> list[Event]:
        return store.events_from_sql(self.stream, self.content, after)


SnapshotLoader = Callable[[], Snapshot]


def load_snapshot(db: Session, stream_id: str) -> Snapshot | None:
    """Read a stream row and its message's content in one statement (one snapshot, so the
    seq layout and the text always belong together)."""
    row = db.execute(
        select(Stream, Message.content)
        .join(Message, Message.id == Stream.message_id)
        .where(Stream.id == stream_id)
    ).first()
    return None if row is None else Snapshot(row[0], row[1])


@dataclass
class Follower:
    log: ChunkLog
    hub: Hub
    blocks: BlockCache
    stream_id: str
    snapshot: SnapshotLoader
    # Set whenever the viewer should look again: the hub has events or a flag for it, the
    # client sent something or went away, the process is shutting down.
    wake: threading.Event = field(default_factory=threading.Event)
    # The viewer's socket, for the hub to write to directly while the viewer waits.
    direct: DirectWrite | None = None
    stale_ms: float = 8000.0  # a running writer whose heartbeat is older is presumed dead
    # True while the batch just yielded is a catch-up block that another read follows.
    more: bool = False
    _told: str | None = field(default=None, init=False)  # the last queue notice sent

    def follow(self, after: int, finished: bool) -> Followed:
        """``finished``: whether SQL had the stream ended when the viewer asked."""
        if (
            finished
            and not self.blocks.holds_end(self.stream_id, after)
            and not self.blocks.exists(self.stream_id)
        ):
            # The log expired: SQL has it all (rebuilt once, shared by every viewer).
            replay = self.blocks.replay(self.stream_id, self._replay)
            part = None if replay is None else replay.since(after)
            if part is not None:
                yield part
            return
        cursor, ended = yield from self._drain(after)
        CATCHUP.observe(cursor - after)
        if ended:
            return
        sub = self.hub.subscribe(self.stream_id, cursor, self.wake)
        sub.direct = self.direct
        try:
            yield from self._tail(sub, cursor)
        finally:
            self.hub.unsubscribe(sub)

    def _replay(self) -> tuple[Batch | None, bool]:
        """The whole stream as SQL has it; others may share it once SQL has it ended."""
        snap = self.snapshot()
        events = snap.events(0)
        return (Batch.of(events) if events else None), snap.finished

    def _tail(self, sub: Subscription, cursor: int) -> Iterator[Batch | Notice | None]:
        # Entries written between the catch-up and the subscription: read them now.
        cursor, ended = yield from self._drain(cursor)
        if not ended and (notice := self._news(self._placed(), cursor)):
            yield notice  # at the log's end of a queued answer: its place in line
        while not ended:
            sub.park(cursor, self._told)
            if not self.wake.is_set():
                yield None  # nothing now: the caller waits for ``wake`` (or parks), resumes us
            cursor = sub.unpark() or cursor  # the hub may have written batches meanwhile
            self.wake.clear()
            batches, reread, check = sub.take()
            if notice := self._news(sub.take_notice(), cursor):
                yield notice  # older than the batches taken with it
            if check or reread:
                before = cursor
                if check:
                    cursor, ended = yield from self._recheck(cursor)
                else:
                    cursor, ended = yield from self._drain(cursor)
                # A notice published before the hub listened (or dropped) is in the state.
                if (
                    cursor == before
                    and not ended
                    and (notice := self._news(self._placed(), cursor))
                ):
                    yield notice
            for batch in batches:
                if ended:
                    break
                cursor, ended = yield from self._deliver(batch, cursor)

    def _placed(self) -> Notice | None:
        """The queued answer's place in line as the stream's state keeps it, if known."""
        place = self.blocks.place(self.stream_id)
        return None if place is None else Notice(*place)

    def _news(self, notice: Notice | None, cursor: int) -> Notice | None:
        """``notice`` if the viewer should get it: given at its cursor (not older than what
        it has), and not the place it was last told (the hub may bring that again)."""
        if notice is None or notice.at != cursor or notice.text == self._told:
            return None
        self._told = notice.text
        return notice

    def _deliver(self, batch: Batch, cursor: int) -> Drain:
        part = batch.since(cursor)
        if part is None:
            return cursor, False  # already delivered by a log read
        if part.first > cursor + 1:
            return (yield from self._drain(cursor))  # a gap: the log fills it
        yield part
        return part.last, self._ends_with_final(part)

    def _ends_with_final(self, batch: Batch) -> bool:
        """A terminal event ends the attach unless an admin retry has already continued the
        stream after it (a ``resumed`` event follows). Only a batch's last event can be
        final: anything after it in the batch follows it."""
        return (
            batch.types[-1] in TERMINAL_TYPES
            and self.blocks.read(self.stream_id, batch.last) is None
        )

    def _drain(self, cursor: int) -> Drain:
        """Send what the log has after ``cursor``, a block (see BlockCache) at a time.
        ``more`` tells the caller when it may hold a block to write it with the next: only
        when this process keeps the next block. Otherwise the block goes out before the next
        is read from Redis, so nothing waits on a read: a cold catch-up reaches the client
        block by block (its decoding overlaps our reads), and at the live end of a stream,
        where that read finds nothing, the last block is not held for it."""
        block = self.blocks.block
        batch = self.blocks.read(self.stream_id, cursor)
        while batch is not None:
            full = batch.last % block == 0 and batch.types[-1] not in TERMINAL_TYPES
            after = self.blocks.kept(self.stream_id, batch.last) if full else None
            self.more = after is not None
            yield batch
            self.more = False
            cursor = batch.last
            if self._ends_with_final(batch):
                return cursor, True
            if full and after is None:
                after = self.blocks.read(self.stream_id, cursor)
            batch = after
        return cursor, False

    def _recheck(self, cursor: int) -> Drain:
        """Re-read the log; if it has nothing new and the stream ended in SQL, finish from SQL
        (the log expired, or the writer died between its SQL commit and its terminal event)."""
        before = cursor
        cursor, ended = yield from self._drain(cursor)
        if ended or cursor != before:
            return cursor, ended
        state = self.log.state(self.stream_id)
        if state.status == "queued" or (state.status == "running" and self._writer_alive(state)):
            return cursor, False
        snap = self.snapshot()
        if not snap.finished:
            return cursor, False
        events = snap.events(cursor)
        if not events:
            return cursor, True
        yield Batch.of(events)
        return events[-1].seq, True

    def _writer_alive(self, state: LogState) -> bool:
        now_ms = time.time() * 1000
        return state.heartbeat_ms is not None and now_ms - state.heartbeat_ms < self.stale_ms
