"""Let a Redis channel that outlived its kombu connection still restore its messages.

When Celery's consumer loses the broker it calls ``connection.collect()`` and then
``connection.close()``. ``collect()`` closes the channels and then cuts the transport's link
to its kombu Connection (``transport.client = None``). A channel still open after that is
closed by ``close()``, and closing it restores its unacknowledged messages (Redis ack
emulation) through a new connection pool whose parameters kombu reads from
``transport.client``: ``AttributeError: 'NoneType' object has no attribute 'hostname'`` in
``Channel._connparams``. Celery does not count that as a connection error, so the worker dies
("Unrecoverable error"). kombu issue #582 is the same crash on Gossip's channel
(https://github.com/celery/kombu/issues/582); kombu 5.7.0, the newest release, still has it.

How the task channel stays open: Gossip's pub/sub connection reports the outage while the
task channel's BRPOP is in flight. ``collect()`` closes the task channel first; its close
first reads the pending BRPOP reply (https://github.com/celery/kombu/pull/1733, so a popped
message is not lost), which fails on the dead socket before anything is closed. The
transport's ``close_connection`` then stops at the first channel whose close fails (Gossip's,
deleting its auto-delete queue on the dead connection), so nothing closes the task channel
before the link is cut. Seen with busy gevent workers that run Gossip, as the Procfile's do.

The repair: a channel remembers the parameters it last built a pool with, and uses them only
when its transport's client is gone. The late restore then does what it would have done
inside ``collect()``: it puts the messages back on their queue if Redis answers, or fails
with a Redis ConnectionError, which Celery ignores while it reconnects, and leaves them in the
unacked hash; the running task's own ack removes each one, and if the worker dies the
visibility timeout redelivers them. Those acks go through the same channel after the teardown,
so they need the parameters too (unrepaired, each failed with the same AttributeError). A
channel that never built a pool has nothing to restore, and still raises kombu's own error.

A second change, for speed (``reuse_clients``): kombu's Redis channel builds a new redis-py
client for every command it sends without one at hand (``conn_or_acquire``): each publish
(``send_task`` in the web process), each delivered message's unacked record and each ack in
the worker. A client holds no state of its own but its pool, yet building one fills its
table of response callbacks: about 100 µs, several times on the path from a post to its
first chunk. A channel now keeps one client per pool and builds a new one only when its pool
changed (kombu drops its pools when the channel closes). redis-py clients are safe to share:
each command takes its own connection from the pool.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger("relay.worker")

# Where a channel keeps its last pool parameters, by the ``asynchronous`` flag.
REMEMBERED = "_relay_connparams"
# Where a channel keeps the client it reuses (``reuse_clients``).
KEPT_CLIENT = "_relay_client"


def repair_late_restore() -> bool:
    """Make kombu's Redis channels remember their connection parameters (once per process);
    return whether this call patched them."""
    # Imported here, at the call: the transport binds time.sleep when imported, and a gevent
    # worker must have patched it by then (ops/geventfix.py).
    from kombu.transport import redis as transport

    channel_class: Any = transport.Channel  # kombu is untyped
    original: Callable[..., dict[str, Any]] = channel_class._connparams
    if getattr(original, "relay_repaired", False):
        return False

    @functools.wraps(original)
    def _connparams(self: Any, asynchronous: bool = False) -> dict[str, Any]:
        remembered: dict[bool, dict[str, Any]] = self.__dict__.setdefault(REMEMBERED, {})
        gone = self.connection is not None and self.connection.client is None
        if gone and asynchronous in remembered:
            log.info(
                "kombu: a channel outlived its broker connection; it reuses its last parameters"
            )
            return dict(remembered[asynchronous])
        params: dict[str, Any] = original(self, asynchronous=asynchronous)
        remembered[asynchronous] = dict(params)
        return params

    _connparams.relay_repaired = True  # type: ignore[attr-defined]
    channel_class._connparams = _connparams
    return True


def reuse_clients() -> bool:
    """Make kombu's Redis channels reuse one client per pool for the commands they send
    without one (once per process); return whether this call patched them."""
    from kombu.transport import redis as transport

    channel_class: Any = transport.Channel  # kombu is untyped
    if getattr(channel_class.conn_or_acquire, "relay_repaired", False):
        return False

    @contextmanager
    def conn_or_acquire(self: Any, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        pool = self.pool
        kept = self.__dict__.get(KEPT_CLIENT)
        if kept is None or kept.connection_pool is not pool:
            kept = self.__dict__[KEPT_CLIENT] = self._create_client()
        yield kept

    conn_or_acquire.relay_repaired = True  # type: ignore[attr-defined]
    channel_class.conn_or_acquire = conn_or_acquire
    return True
