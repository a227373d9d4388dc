"""Process shutdown: set on SIGTERM (gunicorn.conf.py) so streams close with 1001 "going
away" and clients reconnect to another web process."""

from __future__ import annotations

import threading
from collections.abc import Callable

_going_away = threading.Event()
_listeners: list[Callable[[], None]] = []


def begin() -> None:
    _going_away.set()
    for listener in list(_listeners):
        listener()  # wake waiting viewers so they close now


def on_begin(listener: Callable[[], None]) -> None:
    """Call ``listener`` when the shutdown begins (the hub wakes its viewers)."""
    _listeners.append(listener)
    if _going_away.is_set():
        listener()


def going_away() -> bool:
    return _going_away.is_set()
