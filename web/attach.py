"""Attach a viewer to a stream: catch-up from the log, then the live tail through the hub.

``follow`` yields the events with ``seq > after`` exactly once each, in order, ending with the
terminal event; it yields ``None`` on idle ticks so the caller can notice a closed client,
read client messages or send keepalives. It never yields a duplicate or skips a seq: every
event from the hub is checked against the viewer's cursor, and any gap is filled from the log.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from models import store
from models.chunklog import ChunkLog, LogState
from models.events import Event
from models.tables import TERMINAL_STREAM_STATUSES, Message, Stream
from web.hub import Hub, Subscription
from web.instruments import CATCHUP

# Drain result: (new cursor, whether the terminal event was yielded).
Drain = Generator[Event, None, tuple[int, bool]]


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
    stream_id: str
    snapshot: SnapshotLoader
    idle_s: float = 0.5
    batch: int = 500
    recheck_ticks: int = 20  # safety re-read of the log every recheck_ticks idle ticks
    stale_ms: float = 8000.0  # a running writer whose heartbeat is older is presumed dead

    def follow(self, after: int, initial: Snapshot) -> Generator[Event | None, None, None]:
        if initial.finished and not self.log.exists(self.stream_id):
            yield from initial.events(after)  # the log expired: SQL has it all
            return
        cursor, ended = yield from self._drain(after)
        CATCHUP.observe(cursor - after)
        if ended:
            return
        sub = self.hub.subscribe(self.stream_id, cursor)
        try:
            yield from self._tail(sub, cursor)
        finally:
            self.hub.unsubscribe(sub)

    def _tail(self, sub: Subscription, cursor: int) -> Iterator[Event | None]:
        # Entries written between the catch-up and the subscription: read them now.
        cursor, ended = yield from self._drain(cursor)
        ticks = 0
        while not ended:
            event = sub.get(self.idle_s)
            if event is None:
                ticks += 1
                if sub.lagged or ticks % self.recheck_ticks == 0:
                    sub.lagged = False
                    cursor, ended = yield from self._recheck(cursor)
                if not ended:
                    yield None
                continue
            if event.seq <= cursor:
                continue  # already delivered by a catch-up read
            if event.seq > cursor + 1:
                cursor, ended = yield from self._drain(cursor)  # a gap: the log fills it
                continue
            yield event
            cursor, ended = event.seq, self._final(event)

    def _final(self, event: Event) -> bool:
        """A terminal event ends the attach unless an admin retry has already continued the
        stream after it (a ``resumed`` event follows)."""
        return event.terminal and not self.log.read(self.stream_id, event.seq, 1)

    def _drain(self, cursor: int) -> Drain:
        for event in self.log.iter_from(self.stream_id, cursor, self.batch):
            if event.seq != cursor + 1:
                continue
            yield event
            cursor = event.seq
            if self._final(event):
                return cursor, True
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
        for event in snap.events(cursor):
            yield event
            cursor = event.seq
        return cursor, True

    def _writer_alive(self, state: LogState) -> bool:
        now_ms = time.time() * 1000
        return state.heartbeat_ms is not None and now_ms - state.heartbeat_ms < self.stale_ms
