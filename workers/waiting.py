"""Queue position: while an answer waits for a worker, its owner's feed and its own viewers
are told where it is.

Each sweep, the worker holding the sweeper lock lists the queued answers in SQL, oldest
first (the order workers take new chats in; continuations, which workers take first, are
counted in the same line by when they were first posted), and publishes ``answer.waiting``
(``position``: 1 is next; ``etaSeconds``: position over the answers started per second in
the last minute, absent when none started) on each owner's feed when an answer's position
changed; and the same place, as a ``queued`` notice, to the viewers attached to the answer's
stream (kept in the stream's Redis state for viewers that attach later; see
``ChunkLog.queue_notice``). An answer queued for less than RELAY_QUEUE_POSITION_AFTER_S (1 s)
is left alone: with free workers it is picked up before anyone could read a position.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta

from redis.exceptions import RedisError
from sqlalchemy import func, select

from models import feed
from models.tables import Chat, Stream, utcnow
from workers.runtime import WorkerRuntime

log = logging.getLogger("relay.worker")
RATE_WINDOW = timedelta(minutes=1)
MOST = 10_000  # positions past this are not announced (the estimate means little there)


def announce(rt: WorkerRuntime, announced: dict[str, int]) -> int:
    """Publish the positions that changed since ``announced`` (stream id -> position, kept
    by the caller between sweeps; updated here); return how many were published."""
    now = utcnow()
    with rt.sessions() as db:
        rows = db.execute(
            select(Stream.id, Stream.chat_id, Stream.message_id, Stream.created_at, Chat.user_id)
            .join(Chat, Chat.id == Stream.chat_id)
            .where(Stream.status == "queued")
            .order_by(Stream.created_at, Stream.id)
            .limit(MOST)
        ).all()
        if not rows:
            announced.clear()
            return 0
        started = db.scalar(
            select(func.count()).select_from(Stream).where(Stream.started_at >= now - RATE_WINDOW)
        )
    per_s = (started or 0) / RATE_WINDOW.total_seconds()
    published = 0
    settled = now - timedelta(seconds=rt.settings.queue_position_after_s)
    for position, (stream_id, chat_id, message_id, created_at, user_id) in enumerate(rows, 1):
        if created_at > settled or announced.get(stream_id) == position:
            continue
        eta = round(position / per_s) if per_s else None
        feed.publish(
            rt, user_id, feed.ANSWER_WAITING, chatId=chat_id, streamId=stream_id,
            messageId=message_id, position=position, etaSeconds=eta,
        )  # fmt: skip
        tell_viewers(rt, stream_id, position, eta)
        announced[stream_id] = position
        published += 1
    waiting = {row[0] for row in rows}
    for stream_id in [s for s in announced if s not in waiting]:
        del announced[stream_id]
    return published


def queue_notice(position: int, eta: int | None) -> str:
    """The ``queued`` notice viewers of the stream get (no seq: not an event of its log)."""
    notice: dict[str, object] = {"type": "queued", "position": position}
    if eta is not None:
        notice["etaSeconds"] = eta
    return json.dumps(notice, separators=(",", ":"))


def tell_viewers(rt: WorkerRuntime, stream_id: str, position: int, eta: int | None) -> None:
    """Best effort, like the feed: a place not told now is told at the next change."""
    try:
        rt.log.queue_notice(stream_id, queue_notice(position, eta))
    except RedisError:
        log.warning("stream=%s queue place not published", stream_id, exc_info=True)
