"""A WebSocket viewer: the follower's batches written to one socket, what the client sends
read from it, and, under gevent, the viewer parked while it waits.

A parked viewer holds no greenlet and no WSGI request: its connection lives on a socket of
its own, an io watcher and a timer, and the wake event it shares with the hub. Whatever
needs it (the hub has events or a flag for it, the client sent something or went away, a
keepalive ping is due, the process shuts down) sets that event, which starts a greenlet
that runs the viewer until it waits again. Meanwhile the hub writes the batches that
simply follow straight to its socket (``Subscription.try_direct``). Without gevent (a
threaded server), the viewer waits in its request's thread instead.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any

from simple_websocket import ConnectionClosed

from models.exceptions import BadRequest, RelayError
from web import shutdown
from web.attach import Followed, Follower
from web.chats import cancel_stream, get_stream
from web.errors import UNAVAILABLE_ERRORS, as_unavailable
from web.frames import Batch, Notice
from web.instruments import VIEWERS
from web.runtime import Runtime
from web.websocket import CLOSE_INTERNAL_ERROR, RelayServer

log = logging.getLogger("relay.web")
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
HOLD_BYTES = 256 * 1024


class SocketViewer:
    """One attach over a WebSocket, from the first catch-up batch to the close."""

    def __init__(
        self,
        rt: Runtime,
        ws: RelayServer,
        uid: str,
        follower: Follower,
        batched: bool,
        events: Followed,
    ) -> None:
        self.rt = rt
        self.ws = ws
        self.uid = uid
        self.follower = follower
        self.stream_id = follower.stream_id
        self._held: list[bytes] = []  # catch-up blocks to write together
        self.batched = batched
        self.events = events
        self.wake: threading.Event = ws.event  # shared with the follower and the hub
        self._parked = False
        self.wheel_slot: int | None = None  # owned by the keepalive wheel

    def run(self) -> None:
        """Serve until the viewer ends or parks (it then resumes in a greenlet of its own)."""
        try:
            self.ws.arm(self.wake.set)  # a client message wakes or interrupts a long catch-up
            if self._serve():
                return  # parked
        except ConnectionClosed:
            pass
        except RelayError as exc:  # e.g. a bad client message
            self._close(exc.ws_close, exc.message)
        except UNAVAILABLE_ERRORS as exc:
            log.warning("socket ended: backend unavailable (%s)", type(exc).__name__)
            unavailable = as_unavailable(exc)  # 1013: the client retries later, after=<last>
            self._close(unavailable.ws_close, unavailable.message)
        except Exception:
            log.exception("stream=%s viewer failed", self.stream_id)
            self._close(CLOSE_INTERNAL_ERROR, "internal error")
        self._end()

    def _serve(self) -> bool:
        """Send batches until the stream ends (False) or the viewer parks (True)."""
        for batch in self.events:
            self._read_client()
            if shutdown.going_away():
                self._close(CLOSE_GOING_AWAY, "server restarting; reconnect with after=<last seq>")
                return False
            if batch is not None:
                self._send(batch)
            elif not self._wait():
                return True
        # The follower ends right after the stream's final terminal event.
        self._write_held()
        self._close(CLOSE_NORMAL, "stream ended")
        return False

    def _send(self, batch: Batch | Notice) -> None:
        """Write a batch; a catch-up block that another read follows is held, so a long
        catch-up goes out in a few large writes rather than one per block."""
        frames = self.ws.frames(batch, self.batched)
        if self.follower.more and sum(map(len, self._held)) < HOLD_BYTES:
            self._held.append(frames)
            return
        if self._held:
            self._held.append(frames)
            frames, self._held = b"".join(self._held), []
        self.ws.send_bytes(frames)

    def _write_held(self) -> None:
        if self._held:
            frames, self._held = b"".join(self._held), []
            self.ws.send_bytes(frames)

    def _wait(self) -> bool:
        """Nothing to send: wait for the wake event here (True), or park (False)."""
        self._write_held()
        self.ws.flush()  # what a direct write left unsent
        if self.wake.is_set():
            return True
        if self.ws.watched:
            self._park()
            return False
        self.wake.wait(self.rt.settings.idle_tick_s)
        return True

    def _read_client(self) -> None:
        """Handle what the client sent (cancel); raises ConnectionClosed once it has gone."""
        for kind in self.ws.client_messages():
            if kind == "cancel":
                with self.rt.sessions() as db:
                    cancel_stream(self.rt, db, get_stream(db, self.uid, self.stream_id))
            elif kind != "ping":
                raise BadRequest('client messages are {"type": "cancel"} or {"type": "ping"}')

    # -- parking (gevent) ----------------------------------------------------------------------

    def _park(self) -> None:
        if not self._parked:
            self.ws.detach()  # the request returns now; the connection stays
            self._parked = True
        self.ws.arm(self.wake.set)
        keepalive_wheel(self.ws.loop).add(self, self.ws.until_keepalive())
        self.wake.rawlink(self._resume)  # type: ignore[attr-defined]

    def keepalive_due(self) -> None:
        """The wheel's call when this parked viewer's ping is due: ping from the hub when
        that needs no waiting (the pong is taken in by the socket's watcher), else wake the
        viewer to do it (or to close a client that did not answer)."""
        if self.ws.ping_now():
            keepalive_wheel(self.ws.loop).add(self, self.ws.until_keepalive())
        else:
            self.wake.set()

    def _resume(self, _event: object) -> None:
        """Called by gevent's hub when the wake event is set: run again in a new greenlet."""
        import gevent

        self.wake.unlink(self._resume)  # type: ignore[attr-defined]
        keepalive_wheel(self.ws.loop).remove(self)
        gevent.spawn(self.run)

    # -- ending ---------------------------------------------------------------------------------

    def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):  # already closed by either side
            self.ws.close(code, reason[:120])

    def _end(self) -> None:
        self.events.close()
        self.ws.disarm()
        if self.ws.loop is not None:
            keepalive_wheel(self.ws.loop).remove(self)
        if self._parked:  # the request is long gone: the socket is ours to close
            self.ws.finish()
            with contextlib.suppress(OSError):
                self.ws.sock.close()
        VIEWERS.labels("ws").dec()


class KeepaliveWheel:
    """One timer for the keepalive pings of every parked viewer of the process, instead of
    a timer each: viewers wait in one-second slots of when their next ping is due."""

    def __init__(self, loop: Any) -> None:
        self._slots: dict[int, set[SocketViewer]] = {}
        self._timer = loop.timer(1.0, 1.0)
        self._timer.start(self._turn)

    def add(self, viewer: SocketViewer, due_in: float) -> None:
        self.remove(viewer)
        slot = int(time.monotonic() + due_in) + 1
        self._slots.setdefault(slot, set()).add(viewer)
        viewer.wheel_slot = slot

    def remove(self, viewer: SocketViewer) -> None:
        if viewer.wheel_slot is not None:
            self._slots.get(viewer.wheel_slot, set()).discard(viewer)
            viewer.wheel_slot = None

    def _turn(self) -> None:
        now = int(time.monotonic())
        for slot in [s for s in self._slots if s <= now]:
            for viewer in self._slots.pop(slot):
                viewer.wheel_slot = None
                viewer.keepalive_due()


_wheels: dict[int, KeepaliveWheel] = {}


def keepalive_wheel(loop: Any) -> KeepaliveWheel:
    """The wheel of this event loop (one per process: gevent runs one loop)."""
    wheel = _wheels.get(id(loop))
    if wheel is None:
        wheel = _wheels[id(loop)] = KeepaliveWheel(loop)
    return wheel
