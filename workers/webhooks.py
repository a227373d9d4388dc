"""Completion webhooks: tell the deployment when an answer ended while nobody watched it.

An outbox in SQL: every end (whoever wrote it: the worker, a cancel, the sweeper, the CLI)
leaves the stream's ``notice`` empty. Each sweep, the worker holding the sweeper lock looks
at the streams that ended recently with no notice decided: one with a viewer attached at its
end is ``skipped`` (the person saw it end); the others become ``queued`` (a compare-and-set,
so one sweep decides) and a ``relay.webhook`` task delivers them. Delivery is at least once:
the ``webhook-id`` header (the stream and its terminal seq) is the same on every try of the
same end, for the receiver to drop a repeat. Signed the Standard Webhooks way
(standardwebhooks.com: ``webhook-id``, ``webhook-timestamp``, ``webhook-signature``:
HMAC-SHA256 of ``id.timestamp.body``), as OpenAI's and Svix's webhooks are, so receivers
verify them with any standard-webhooks library.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from models.tables import (
    ACTIVE_STREAM_STATUSES,
    TERMINAL_STREAM_STATUSES,
    Chat,
    Message,
    Stream,
    utcnow,
)
from workers.runtime import WorkerRuntime

log = logging.getLogger("relay.webhooks")

EVENT_TYPE = "answer.finished"
# Streams that ended longer ago than this are not notified any more (a deployment that just
# turned webhooks on does not announce its history).
LOOKBACK = timedelta(minutes=10)
PREVIEW_CHARS = 280
BATCH = 500


class RetryableDelivery(Exception):
    """The receiver could not take it now (a network error, 408, 429 or 5xx): try again."""


@dataclass(frozen=True)
class Outcome:
    status: int
    delivery_id: str


def sweep(rt: WorkerRuntime) -> list[str]:
    """Decide the notice of every stream that ended recently without one; return the ids of
    those queued for delivery (the caller sends their tasks)."""
    queued: list[str] = []
    with rt.sessions() as db:
        rows = db.execute(
            select(Stream.id, Stream.finished_at)
            .where(
                Stream.status.in_(TERMINAL_STREAM_STATUSES),
                Stream.finished_at >= utcnow() - LOOKBACK,
                Stream.notice.is_(None),
            )
            .limit(BATCH)
        ).all()
        if not rows:
            return queued
        _, states = rt.log.states([stream_id for stream_id, _ in rows])
        for (stream_id, _), state in zip(rows, states, strict=True):
            if state.status in ACTIVE_STREAM_STATUSES:
                continue  # SQL's end is written first: the log's terminal event is on its way
            watched = state.watched_end  # (False when Redis no longer has the state)
            if _decide(db, stream_id, "skipped" if watched else "queued") and not watched:
                queued.append(stream_id)
    return queued


def _decide(db: Session, stream_id: str, notice: str) -> bool:
    res = db.execute(
        update(Stream).where(Stream.id == stream_id, Stream.notice.is_(None)).values(notice=notice)
    )
    db.commit()
    return bool(res.rowcount)  # type: ignore[attr-defined]


def payload(db: Session, stream_id: str) -> tuple[str, dict[str, Any]] | None:
    """The delivery id and the body for the stream's last end (None: it is gone, or it was
    retried and runs again: that end is no longer the news)."""
    row = db.execute(
        select(Stream, Message.content, Chat.user_id, Chat.title)
        .join(Message, Message.id == Stream.message_id)
        .join(Chat, Chat.id == Stream.chat_id)
        .where(Stream.id == stream_id)
    ).first()
    if row is None:
        return None
    stream, content, user_id, title = row
    if stream.status not in TERMINAL_STREAM_STATUSES or stream.finished_at is None:
        return None
    error = (
        {"code": stream.error_code, "message": stream.error_message or ""}
        if stream.error_code
        else None
    )
    body = {
        "type": EVENT_TYPE,
        "timestamp": _iso(stream.finished_at),
        "data": {
            "streamId": stream.id,
            "chatId": stream.chat_id,
            "messageId": stream.message_id,
            "userId": user_id,
            "chatTitle": title,
            "status": stream.status,
            "endReason": stream.end_reason,
            "error": error,
            "lastSeq": stream.last_seq,
            "preview": content[:PREVIEW_CHARS],
            "chars": len(content),
        },
    }
    return f"{stream.id}.{stream.last_seq}", body


def deliver(rt: WorkerRuntime, stream_id: str) -> Outcome | None:
    """POST the stream's notice once; raise RetryableDelivery when another try may succeed.
    None when there is nothing to send any more."""
    settings = rt.settings
    with rt.sessions() as db:
        built = payload(db, stream_id)
    if built is None:
        return None
    delivery_id, body = built
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False)
    sent_at = datetime.now(UTC)
    headers = {
        "content-type": "application/json",
        "user-agent": "relay-webhooks/1",
        "webhook-id": delivery_id,
        "webhook-timestamp": str(int(sent_at.timestamp())),
        "webhook-signature": Webhook(settings.webhook_secret).sign(delivery_id, sent_at, data),
    }
    try:
        resp = httpx.post(
            settings.webhook_url, content=data.encode(), headers=headers,
            timeout=settings.webhook_timeout_s, follow_redirects=False,
        )  # fmt: skip
    except httpx.TransportError as exc:
        raise RetryableDelivery(f"{type(exc).__name__}: {exc}") from exc
    if resp.status_code in (408, 429) or resp.status_code >= 500:
        raise RetryableDelivery(f"the receiver answered {resp.status_code}")
    return Outcome(resp.status_code, delivery_id)


def send_due(rt: WorkerRuntime, send: Callable[[str], None]) -> int:
    """One outbox pass (the sweeper's, under its lock): queue what is due and send a task
    for each; a task that cannot be sent puts its stream back for the next pass."""
    queued = sweep(rt)
    for stream_id in queued:
        try:
            send(stream_id)
        except Exception:
            log.warning("stream=%s webhook task not sent; next sweep", stream_id, exc_info=True)
            record(rt, stream_id, None)
            raise
    return len(queued)


def record(rt: WorkerRuntime, stream_id: str, notice: str | None) -> None:
    """Store how the delivery went (sent, failed; None: not sent, decide again), unless the
    stream was retried since."""
    with rt.sessions() as db:
        db.execute(
            update(Stream)
            .where(Stream.id == stream_id, Stream.notice == "queued")
            .values(notice=notice)
        )
        db.commit()


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")
