"""A user's live feed: what happens to their chats, as a small resumable log per user.

Each user has a Redis Stream of events (chat created, renamed or deleted; an answer queued,
started, finished) numbered 1, 2, 3, ... without holes; one atomic script assigns the next
seq, keeps the last ``keys.FEED_MAX_LEN`` entries, refreshes the TTL and publishes the event
on the user's channel, where the web tier's feed subscriber (web/feedhub.py) picks it up.

The feed only notifies: SQL and the chunk log stay the truth. Writing to it never fails the
operation it reports (``publish`` and the helpers below log the error and count it in
``relay_feed_write_failures``), and an event is written after the change it reports, at most
once (a process that dies in between loses the event, never the change). A page that may
have missed events is told to reload (a ``reset``: see ``Feed.read``).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from prometheus_client import Counter
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from models import keys, scripts
from models.chunklog import ChunkLog
from models.redisconn import OUTAGES, RedisClient, ScriptCall, described
from models.tables import Chat, Stream

log = logging.getLogger("relay.feed")
WRITE_FAILURES = Counter(
    "relay_feed_write_failures",
    "Feed events not written (Redis or SQL unreachable); the change they report was made",
)
CHAT_CREATED, CHAT_RENAMED, CHAT_DELETED = "chat.created", "chat.renamed", "chat.deleted"
ANSWER_QUEUED, ANSWER_STARTED = "answer.queued", "answer.started"
ANSWER_FINISHED = "answer.finished"
ANSWER_WAITING = "answer.waiting"  # queue position (workers/waiting.py)
RESET = "reset"


class HasLog(Protocol):
    """A web or worker runtime: anything that holds the chunk log."""

    log: ChunkLog


# Where a feed event goes: the log's Redis, through a runtime, the chunk log or a client.
Target = HasLog | ChunkLog | RedisClient
Sessions = Session | sessionmaker[Session]


@dataclass(frozen=True)
class FeedPage:
    """What a reader gets after its cursor: ``events`` (seq, JSON) in order; ``reset`` is the
    feed's last seq when the reader cannot be brought up to date event by event (it asked
    from nowhere, or from before what the feed keeps): it reloads, then goes on from there."""

    events: list[tuple[int, str]] = field(default_factory=list)
    reset: int | None = None

    @property
    def last(self) -> int | None:
        """The reader's new cursor (None: unchanged)."""
        if self.events:
            return self.events[-1][0]
        return self.reset


def reset_event(seq: int) -> str:
    return json.dumps({"type": RESET, "seq": seq})


class Feed:
    """Append to and read from users' feeds."""

    def __init__(
        self,
        client: RedisClient,
        *,
        max_len: int = keys.FEED_MAX_LEN,
        ttl_s: int = keys.FEED_TTL_S,
    ) -> None:
        self.redis = client
        self.max_len = max_len
        self.ttl_s = ttl_s
        self._append = client.register_script(scripts.FEED_APPEND)

    def append(self, user_id: str, *events: dict[str, Any]) -> int:
        """Add ``events`` (without their seqs) to the user's feed in one step and publish
        them; the last one's seq."""
        return int(self._append(keys=[keys.feed_key(user_id)], args=self._args(user_id, events)))

    def append_command(self, user_id: str, *events: dict[str, Any]) -> list[Any]:
        """``append`` as a command for a pipeline (the worker's flusher sends its answers'
        events with the appends); the reply is the last one's seq. A NoScriptError reply
        means the server lost the script: ``append`` loads it."""
        return ["EVALSHA", self._append.sha, 1, keys.feed_key(user_id),
                *self._args(user_id, events)]  # fmt: skip

    def append_call(self, user_id: str, *events: dict[str, Any]) -> ScriptCall:
        """``append`` as a call for ``run_together`` (the post sends it with the log's init)."""
        return self.append_command(user_id, *events), functools.partial(
            self.append, user_id, *events
        )

    def _args(self, user_id: str, events: tuple[dict[str, Any], ...]) -> list[str | int]:
        bodies = [json.dumps(event, separators=(",", ":")) for event in events]
        return [keys.feed_channel(user_id), self.max_len, self.ttl_s, *bodies]

    def last_seq(self, user_id: str) -> int:
        entries = cast(
            list[tuple[str, Any]], self.redis.xrevrange(keys.feed_key(user_id), "+", "-", count=1)
        )
        return _seq(entries[0][0]) if entries else 0

    def read(self, user_id: str, after: int | None, count: int = 500) -> FeedPage:
        """The events after ``after`` (at most ``count``), or a reset: when ``after`` is None
        (a reader that starts now), older than the oldest event kept, or beyond the last
        one (the feed expired, or Redis lost it)."""
        while after is not None:
            entries = cast(
                list[tuple[str, dict[str, str]]],
                self.redis.xrange(keys.feed_key(user_id), f"0-{after + 1}", "+", count=count),
            )
            if entries:
                if _seq(entries[0][0]) != after + 1:
                    break  # trimmed: the events right after ``after`` are gone
                return FeedPage(events=[(_seq(eid), fields["e"]) for eid, fields in entries])
            last = self.last_seq(user_id)
            if last == after:
                return FeedPage()
            if last < after:
                return FeedPage(reset=last)
            # Events were added between the two reads: read them.
        return FeedPage(reset=self.last_seq(user_id))


def _seq(entry_id: str) -> int:
    return int(entry_id.rsplit("-", 1)[1])


def _client(target: Target) -> RedisClient:
    if isinstance(target, ChunkLog):
        return target.redis
    if hasattr(target, "log"):
        return cast(HasLog, target).log.redis
    return target


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_of(kind: str, **fields: Any) -> dict[str, Any]:
    """A feed event without its seq: the fields that are not None, and the time."""
    return {"type": kind, **{k: v for k, v in fields.items() if v is not None}, "at": now_iso()}


def publish(target: Target, user_id: str, kind: str, **fields: Any) -> int | None:
    """Write one event to the user's feed: its seq, or None when that failed (logged and
    counted; never raised: the change it reports has been made)."""
    return publish_events(target, user_id, [event_of(kind, **fields)])


def publish_events(target: Target, user_id: str, events: list[dict[str, Any]]) -> int | None:
    """``publish`` for several events at once (one round trip): the last one's seq."""
    try:
        return Feed(_client(target)).append(user_id, *events)
    except Exception as exc:
        not_written(user_id, events, exc)
        return None


def not_written(user_id: str, events: list[dict[str, Any]], exc: BaseException) -> None:
    """Log and count events that could not be written (the change they report stands)."""
    WRITE_FAILURES.inc(len(events))
    kinds = ",".join(str(event["type"]) for event in events)
    log.warning("feed user=%s %s not written: %s", user_id, kinds, described(exc),
                exc_info=not isinstance(exc, OUTAGES))  # fmt: skip


def publish_chat(target: Target, user_id: str, kind: str, chat: Chat) -> int | None:
    """``chat.created``, ``chat.renamed`` or ``chat.deleted`` for ``chat``."""
    return publish(target, user_id, kind, chatId=chat.id, title=chat.title)


def turn_events(
    chat_id: str, title: str, stream_id: str, message_id: str, *, new_chat: bool
) -> list[dict[str, Any]]:
    """What a committed post tells its user's feed: ``chat.created`` (when its chat is new),
    then ``answer.queued`` (written before the task is sent, so it comes before
    ``answer.started``)."""
    events = [event_of(CHAT_CREATED, chatId=chat_id, title=title)] if new_chat else []
    events.append(event_of(ANSWER_QUEUED, chatId=chat_id, streamId=stream_id, messageId=message_id))
    return events


def publish_answer(
    target: Target,
    db: Sessions,
    stream_id: str,
    kind: str,
    status: str | None = None,
    reason: str | None = None,
) -> int | None:
    """An ``answer.*`` event for a stream, to its chat's owner (looked up in SQL, through
    ``db``: a session, or a sessionmaker for a short session of its own)."""
    try:
        owner = _owner(db, stream_id)
    except Exception as exc:
        WRITE_FAILURES.inc()
        log.warning("feed stream=%s %s not written: owner unknown: %s", stream_id, kind,
                    described(exc), exc_info=not isinstance(exc, OUTAGES))  # fmt: skip
        return None
    if owner is None:
        return None  # the chat was deleted meanwhile
    user_id, chat_id, message_id = owner
    return publish(
        target, user_id, kind, chatId=chat_id, streamId=stream_id, messageId=message_id,
        status=status, reason=reason,
    )  # fmt: skip


def _owner(db: Sessions, stream_id: str) -> tuple[str, str, str] | None:
    """(user id, chat id, message id) of a stream."""
    if not isinstance(db, Session):
        with db() as session:
            return _owner(session, stream_id)
    row = db.execute(
        select(Chat.user_id, Stream.chat_id, Stream.message_id)
        .join(Chat, Chat.id == Stream.chat_id)
        .where(Stream.id == stream_id)
    ).first()
    return None if row is None else (row[0], row[1], row[2])
