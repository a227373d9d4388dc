"""Limits that keep one user (or one address making guests) from starving everyone else.

- Answers a user may have queued or running at once (RELAY_MAX_RUNNING_PER_USER, 3): a post
  past it is 429 ``too_many_running``. This is also what keeps the queue fair: a flood from
  one user cannot put more than that many answers ahead of anyone else's, so another user's
  answer starts as soon as a worker slot is free. Counted in SQL at the post (its active
  streams), so it needs no counter to keep in step with workers that crash.
- Posts per user per minute (RELAY_POSTS_PER_MINUTE, 20) and new guest users per client
  address per minute (RELAY_NEW_GUESTS_PER_MINUTE, 30; a request without the session cookie
  is a new guest, so per-user limits alone would not stop a cookie-less flood): 429
  ``rate_limited``. Moving windows in Redis, shared by every web process, from the ``limits``
  package (the engine behind Flask-Limiter; its Lua scripts count atomically in Redis).

Every 429 carries Retry-After.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager

import limits
from flask import request
from limits.storage import RedisClusterStorage, RedisStorage
from limits.strategies import MovingWindowRateLimiter
from redis.cluster import RedisCluster
from redis.exceptions import LockError, RedisClusterException, RedisError
from redis.lock import Lock
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from models import keys
from models.exceptions import TooManyRequests, TooManyRunning
from models.redisconn import ClusterURL
from models.tables import ACTIVE_STREAM_STATUSES, Chat, Stream
from ops.geventfix import start_background
from web.runtime import Runtime

_limiters: dict[int, MovingWindowRateLimiter] = {}


def _limiter(rt: Runtime) -> MovingWindowRateLimiter:
    """One limiter per process (per Redis pool), on relay's own Redis connections (on a
    cluster, on the ``limits`` package's own cluster client for the same nodes)."""
    client = rt.log.redis
    limiter = _limiters.get(id(client))
    if limiter is None:
        if isinstance(client, RedisCluster):
            # Each counter is one key, so it lives on one node; the package's cluster
            # storage keeps its own client (it registers its scripts on it).
            url = rt.settings.log_redis_url or rt.settings.redis_url
            parsed = ClusterURL.parse(url)
            hosts = ",".join(f"{host}:{port}" for host, port in parsed.hosts)
            auth = {k: v for k, v in parsed.auth().items() if v is not None}
            storage: RedisStorage = RedisClusterStorage(
                f"redis+cluster://{hosts}", key_prefix=keys.RATE_LIMIT_PREFIX,
                socket_connect_timeout=5, **auth,
            )  # fmt: skip
        else:
            # The pool decides where the counters go (a plain server or Sentinel's master).
            storage = RedisStorage(
                "redis://", connection_pool=client.connection_pool,
                key_prefix=keys.RATE_LIMIT_PREFIX,
            )  # fmt: skip
        limiter = _limiters[id(client)] = MovingWindowRateLimiter(storage)
    return limiter


def _hit(rt: Runtime, per_minute: int, what: str, who: str, message: str) -> None:
    if per_minute <= 0:
        return
    item = limits.RateLimitItemPerMinute(per_minute)
    limiter = _limiter(rt)
    if limiter.hit(item, what, who):
        return
    reset = limiter.get_window_stats(item, what, who).reset_time
    raise TooManyRequests(message, math.ceil(reset - time.time()))


@contextmanager
def admitted(rt: Runtime, db: Session, uid: str) -> Iterator[None]:
    """Admit a new answer for ``uid`` (its rate, then its running answers) and hold the
    admission until the body has committed the answer: a user's posts are counted one at a
    time (a Redis lock per user, across web processes), so twenty posted at once cannot all
    see two running and all be let in."""
    per_minute = rt.settings.posts_per_minute
    _hit(rt, per_minute, "posts", uid, f"at most {per_minute} posts a minute; slow down")
    most = rt.settings.max_running_per_user
    if most <= 0:
        yield
        return
    lock = rt.log.redis.lock(
        keys.post_lock(uid), timeout=10, blocking_timeout=10, sleep=0.01, thread_local=False
    )
    if not lock.acquire():
        raise TooManyRequests("your other posts are still being handled; retry", 1)
    try:
        running = db.scalar(
            select(func.count())
            .select_from(Stream)
            .join(Chat, Chat.id == Stream.chat_id)
            .where(Chat.user_id == uid, Stream.status.in_(ACTIVE_STREAM_STATUSES))
        )
        if (running or 0) >= most:
            raise TooManyRunning(
                f"you have {running} answers queued or running (at most {most}); "
                "wait for one to end, or cancel one"
            )
        yield
    finally:
        # Beside the post's next round trip (the feed's events and the log's init), not
        # before it: the lock is released a moment later, the post answers a round trip sooner.
        start_background(functools.partial(_release, lock), "post-lock-release")


def _release(lock: Lock) -> None:
    """Release a user's admission lock; one that expired meanwhile, or a Redis that went away
    (it expires after its timeout), is not an error."""
    with contextlib.suppress(LockError, RedisError, RedisClusterException):
        lock.release()


def check_new_guest(rt: Runtime) -> None:
    """Before a new guest user is stored: how many this client address made lately."""
    per_minute = rt.settings.new_guests_per_minute
    address = request.remote_addr or "unknown"
    _hit(
        rt, per_minute, "guests", address,
        f"at most {per_minute} new guest users a minute from one address; keep the session "
        "cookie (or use a bearer token)",
    )  # fmt: skip
