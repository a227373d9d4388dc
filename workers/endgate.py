"""Answers' final SQL writes go one at a time, once the event loop has nothing else to run.

A final write (``store.finalize``: the answer's whole text, its layout, the stream's end)
holds a gevent worker's event loop for its whole length with SQLite (about 0.4 ms: sqlite3
does not yield). Answers often end together (a burst of posts ends in a burst of ends), and
200 ends in a row held the loop for ~100 ms while the appender's flusher, which confirms
every other stream's pieces, waited behind them: the last pieces of a burst reached their
viewers up to 240 ms late (docs/performance.md, "The ends"). The gate lets one final write
go at a time, and only when the loop is idle (``gevent.idle``: no socket, timer or greenlet
ready), so the flusher's replies and the other streams' reads go first. An end waits for
that at most ``patience_s`` from when it asked (a loop that is never idle, a saturated
worker, still ends its answers), plus the writes ahead of it; no piece waits at all.

Under the threads pool (no gevent) the gate only takes turns: a thread's SQLite write
releases the GIL, so the other threads are not held up as greenlets are.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def _gevent() -> Any:
    """The gevent module when this process is monkey-patched (a gevent worker), else None."""
    try:
        import gevent
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a dependency
        return None
    return gevent if monkey.is_module_patched("threading") else None


class EndGate:
    """Turns for the final writes of one worker process (one owner: the runtime)."""

    def __init__(self, patience_s: float = 0.05) -> None:
        self.patience_s = patience_s
        self._turns = threading.Lock()  # a gevent lock once the process is patched
        self.waited_out = 0  # turns taken because the loop was not idle within patience

    @contextmanager
    def turn(self) -> Iterator[None]:
        deadline = time.monotonic() + self.patience_s
        with self._turns:
            left = deadline - time.monotonic()
            if left > 0:
                self._wait_idle(left)
            yield

    def _wait_idle(self, timeout: float) -> None:
        gevent = _gevent()
        if gevent is None:
            return
        with gevent.Timeout(timeout, False):
            gevent.idle()
            return
        self.waited_out += 1
