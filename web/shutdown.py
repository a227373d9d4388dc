"""Process shutdown: set on SIGTERM (gunicorn.conf.py) so streams close with 1001 "going
away" and clients reconnect to another web process."""

from __future__ import annotations

import threading

_going_away = threading.Event()


def begin() -> None:
    _going_away.set()


def going_away() -> bool:
    return _going_away.is_set()
