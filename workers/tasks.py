"""Celery tasks: thin wrappers that take a stream ID and call plain functions."""

from __future__ import annotations

import logging
import random

from celery import Task
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import OperationalError

from workers import webhooks
from workers.celery_app import GENERATE, WEBHOOK, app
from workers.generation import run_generation
from workers.runtime import get_runtime

log = logging.getLogger("relay.webhooks")


class AnswerFailed(Exception):
    """The task's answer ended ``failed`` (its error event and SQL say why)."""


class AnswerCancelled(Exception):
    """The task's answer ended ``cancelled``."""


# A database or Redis outage before the stream is claimed: retry the same task (same id, so
# a revoke still applies) with backoff rather than leave the stream queued until the sweeper.
@app.task(  # type: ignore[untyped-decorator]
    name=GENERATE,
    bind=True,
    autoretry_for=(OperationalError, RedisConnectionError),
    retry_backoff=2,
    retry_backoff_max=30,
    max_retries=20,
    # Expected outcomes: logged in one line, without a traceback.
    throws=(AnswerFailed, AnswerCancelled),
)
def generate(self: Task, stream_id: str) -> str:
    """Generate (or continue) the answer for ``stream_id``. An answer that ended failed or
    cancelled ends the task with an exception naming it, so Celery's events (and Flower)
    show it as a failure, not a success; everything is stored before it is raised."""
    outcome = run_generation(get_runtime(), stream_id, self.request.id)
    if outcome == "failed":
        raise AnswerFailed(f"stream {stream_id} ended failed (see its error event)")
    if outcome == "cancelled":
        raise AnswerCancelled(f"stream {stream_id} was cancelled")
    return outcome


@app.task(name=WEBHOOK, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def notify(self: Task, stream_id: str) -> str:
    """Deliver a stream's completion webhook; tried again with exponential backoff (1 s, 2 s,
    4 s, ... up to 5 min, with jitter) while the receiver cannot take it, up to
    RELAY_WEBHOOK_MAX_ATTEMPTS tries in all."""
    rt = get_runtime()
    tries = self.request.retries + 1
    try:
        outcome = webhooks.deliver(rt, stream_id)
    except webhooks.RetryableDelivery as exc:
        if tries >= rt.settings.webhook_max_attempts:
            log.warning("stream=%s webhook failed after %d tries: %s", stream_id, tries, exc)
            webhooks.record(rt, stream_id, "failed")
            return "failed"
        delay = min(2.0**self.request.retries, 300.0) * random.uniform(0.8, 1.2)
        log.info("stream=%s webhook try %d: %s; again in %.1fs", stream_id, tries, exc, delay)
        raise self.retry(exc=exc, countdown=delay) from exc
    if outcome is None:
        return "moot"  # deleted, or retried since: that end is no longer the news
    sent = 200 <= outcome.status < 300
    if not sent:  # a 4xx other than 408/429: the receiver refuses it; trying again won't help
        log.warning("stream=%s webhook %s refused: %d", stream_id, outcome.delivery_id,
                    outcome.status)  # fmt: skip
    webhooks.record(rt, stream_id, "sent" if sent else "failed")
    return "sent" if sent else "refused"
