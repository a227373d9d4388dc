"""Repair what gevent's monkey-patching missed in Celery's worker, and what it made slow.

``celery worker --pool gevent`` calls ``gevent.monkey.patch_all()`` before it imports
anything else. While ``patch_all`` patches ``threading`` it looks at every existing object to
find locks, and one of Celery's lazy proxies imports ``celery._state`` when asked for its
class: that imports kombu, whose ``kombu.utils.functional`` runs ``from time import sleep``
before ``time`` is patched. kombu then retries a lost broker connection with the blocking
``time.sleep``, which froze the whole worker (every generation, every heartbeat) for each
back-off step while Redis was down: 6 s in a 4 s outage. This points such early imports at
gevent's versions; it does nothing when the process is not patched.

``readiness_checks_without_yield``: redis-py checks every connection it takes from a pool
for unread data or a closed socket (``can_read``, then a peek), with ``select.poll()`` and a
zero timeout. gevent's ``poll`` waits for that zero timeout on its event loop: two greenlet
switches, a whole turn of the loop (every other ready greenlet runs first) and an io watcher
started and stopped, before each command of the web process and of the worker (a post's
feed event, the log's init and Celery's send; the worker's claim, its feed events and
Celery's acks). The check asks the kernel a question that cannot block, so with a zero
timeout the process's own ``poll`` answers it; any other timeout still waits on gevent's.
urllib3 checks a kept-alive upstream connection the same way before each request
(``is_connection_dropped``): under gevent a turn of the loop between the worker asking a model
and the request leaving, so a request sent in the background (workers/prefetch.py) left only
after the work it was meant to overlap.

``start_background``: a background task that does not wait for its greenlet to begin.

``fast_lock``: ``threading.Lock`` for a lock taken on a hot path. Under gevent the patched
``threading.Lock`` is ``gevent.thread.LockType``, whose ``acquire`` adds a layer of Python to
gevent's compiled semaphore: a ``with`` costs about 420 ns against 165 for the compiled
``BoundedSemaphore`` (which waits cooperatively all the same).
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("relay.worker")

# (module, name bound at import, the patched module and attribute it should be)
EARLY_BINDINGS = (
    ("kombu.utils.functional", "sleep", "time", "sleep"),
    ("kombu.resource", "LifoQueue", "queue", "LifoQueue"),
)


def repair_early_imports() -> list[str]:
    """Rebind what was imported before gevent patched it; return what was repaired."""
    try:
        import gevent.monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return []
    repaired = []
    for module_name, name, source, attr in EARLY_BINDINGS:
        module = sys.modules.get(module_name)
        if module is None or not gevent.monkey.is_module_patched(source):
            continue
        if getattr(module, name, None) is gevent.monkey.get_original(source, attr):
            setattr(module, name, getattr(sys.modules[source], attr))
            repaired.append(f"{module_name}.{name}")
    if repaired:
        log.info("gevent: rebound %s to the patched versions", ", ".join(repaired))
    return repaired


class _Poll:
    """``select.poll()`` for a readiness check: a zero timeout asks the kernel directly (the
    check cannot block); any other goes through the patched ``poll``."""

    __slots__ = ("_fds", "_original", "_patched")

    def __init__(self, original: Any, patched: Any) -> None:
        self._original = original
        self._patched = patched
        self._fds: list[tuple[Any, int | None]] = []

    def register(self, fd: Any, eventmask: int | None = None) -> None:
        self._fds.append((fd, eventmask))

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        poller = self._original() if timeout == 0 else self._patched()
        for fd, mask in self._fds:
            if mask is None:
                poller.register(fd)  # select's default mask
            else:
                poller.register(fd, mask)
        events: list[tuple[int, int]] = poller.poll(timeout)
        return events


class _SelectForChecks:
    """The ``select`` module as a readiness check sees it: the same, but ``poll``."""

    def __init__(self, module: Any, original_poll: Any) -> None:
        self._module = module
        self._original_poll = original_poll

    def poll(self) -> _Poll:
        return _Poll(self._original_poll, self._module.poll)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def readiness_checks_without_yield() -> bool:
    """Let the zero-timeout readiness checks of redis-py (a pooled connection, before each
    command) and of urllib3 (a kept-alive upstream connection, before each request) skip
    gevent's event loop; return whether this call changed anything (False: not patched by
    gevent, or done already)."""
    try:
        import gevent.monkey
    except ImportError:  # pragma: no cover - a dependency
        return False
    if not gevent.monkey.is_module_patched("select"):
        return False
    original_poll = gevent.monkey.get_original("select", "poll")
    changed = False
    for checker in _checkers():
        module = getattr(checker, "select", None)
        if module is None or isinstance(module, _SelectForChecks):
            continue
        setattr(checker, "select", _SelectForChecks(module, original_poll))  # noqa: B010
        changed = True
    return changed


def _checkers() -> list[Any]:
    """The modules whose ``select`` makes the checks: redis-py's hiredis parser
    (``can_read``) and urllib3's ``wait_for_read`` (``is_connection_dropped``)."""
    found: list[Any] = []
    try:
        from redis._parsers import hiredis as parser
    except ImportError:  # pragma: no cover - a dependency
        pass
    else:
        if hasattr(parser, "_socket_can_read"):
            found.append(parser)
    try:
        from urllib3.util import wait
    except ImportError:  # pragma: no cover - a dependency
        pass
    else:
        found.append(wait)
    return found


def start_background(target: Callable[[], None], name: str) -> None:
    """Run ``target`` beside the caller without waiting for it to begin. Under gevent a
    greenlet: a patched ``Thread.start`` waits for the new greenlet to run first, a whole
    turn of the event loop (every other ready greenlet runs, and the new one up to its first
    wait) before the caller goes on. Otherwise a daemon thread."""
    try:
        import gevent
        import gevent.monkey
    except ImportError:  # pragma: no cover - a dependency
        patched = False
    else:
        patched = gevent.monkey.is_module_patched("threading")
    if patched:
        gevent.spawn(target).name = name
    else:
        threading.Thread(target=target, name=name, daemon=True).start()


def fast_lock() -> Any:
    """A new lock with ``threading.Lock``'s behaviour (``acquire(blocking, timeout)``,
    ``release``, ``locked``, a context manager; not reentrant): gevent's compiled
    ``BoundedSemaphore`` when ``threading`` is patched, else ``threading.Lock()``."""
    try:
        import gevent.lock
        import gevent.monkey
    except ImportError:  # pragma: no cover - a dependency
        return threading.Lock()
    if gevent.monkey.is_module_patched("threading"):
        return gevent.lock.BoundedSemaphore()
    return threading.Lock()
