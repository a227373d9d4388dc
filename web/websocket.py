"""relay's WebSocket connections: simple-websocket's server with a compression policy, whole
writes, and frames encoded once per process.

simple-websocket accepts permessage-deflate whenever a client offers it and compresses every
message, and flask-sock builds simple-websocket's ``Server`` itself. relay needs its own
connection class, so ``RelaySock`` is flask-sock's ``route`` with that one class swapped.
Compression is negotiated with ``server_no_context_takeover`` (RFC 7692 allows a server to
add it), so a compressed message is the same bytes on every connection: the frames of a
batch are compressed once, then shared.
"""

from __future__ import annotations

import _socket
import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from functools import wraps
from typing import Any

import gevent.socket
from flask import Response, current_app, request
from flask_sock import Sock
from simple_websocket import ConnectionClosed, Server
from wsproto.connection import Connection, ConnectionType
from wsproto.events import RejectConnection, Request
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.utilities import RemoteProtocolError, generate_accept_token

from models.exceptions import BadRequest
from ops.geventfix import fast_lock
from web.frames import Batch, Deflate, Notice

log = logging.getLogger("relay.web")
CLOSE_INTERNAL_ERROR = 1011
_PING = b"\x89\x00"  # an unmasked ping frame without payload
_SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade"
COMPRESSION_MODES = ("auto", "off")
LINGER_S = 2.0  # how long a closed connection waits for the client's side of the close


class _WholeWrites:
    """The connection's socket, written completely, in order, by one greenlet at a time.

    simple-websocket writes with ``send``, which may write only part of a large frame, and
    its reader thread answers pings while the handler writes events. The hub may also write
    a batch straight to an idle viewer's socket without blocking (``try_send``); what the
    kernel did not take then waits in ``backlog`` and goes out before anything else."""

    __slots__ = ("_lock", "_raw", "_sock", "backlog")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._raw = _os_socket(sock)  # what ``try_send`` writes to
        self._lock = fast_lock()
        self.backlog = b""

    def send(self, data: bytes) -> int:
        with self._lock:
            if self.backlog:
                data, self.backlog = self.backlog + data, b""
            self._write(data)
        return len(data)

    sendall = send

    def _write(self, data: bytes) -> None:
        # One send() writes a frame whole nearly always; gevent's sendall() would also ask
        # the kernel for SO_SNDBUF and arm a timer on every call.
        sent = self._sock.send(data)
        if sent < len(data):
            self._sock.sendall(memoryview(data)[sent:])

    def try_send(self, data: bytes) -> bool:
        """Write without waiting, or not at all (False): the lock is taken, the kernel's
        buffer is full or a backlog is pending. A part the kernel did not take goes to the
        backlog (True all the same: it is queued in order)."""
        if self.backlog or not self._lock.acquire(blocking=False):
            return False
        try:
            sent = _send_nowait(self._raw, data)
            if sent and sent < len(data):
                self.backlog = data[sent:]
            return sent > 0
        except OSError:
            return False  # the viewer's own write will report it
        finally:
            self._lock.release()

    def adopt_dup(self) -> None:
        """Write to (and read from) a duplicate of the socket from now on."""
        with self._lock:
            self._sock = self._sock.dup()
            self._raw = _os_socket(self._sock)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _NoReader:
    """Stands in for simple-websocket's reader thread: under gevent, ``RelayServer`` reads
    the socket itself when it is readable."""

    def __init__(self, target: Callable[[], None]) -> None:
        self.name = "relay-ws-watcher"

    def start(self) -> None:
        pass


def _is_lone_pong(data: bytes) -> bool:
    """Exactly one masked pong frame from a client (payload up to 125 bytes)."""
    return (
        len(data) >= 6
        and data[0] == 0x8A  # FIN + pong
        and data[1] & 0x80 != 0  # masked, as every client frame is
        and len(data) == 6 + (data[1] & 0x7F)
    )


def gevent_loop() -> Any:
    """gevent's event loop when gevent has patched the socket module (gunicorn's gevent
    worker), else None."""
    try:
        from gevent import get_hub, monkey
    except ImportError:
        return None
    return get_hub().loop if monkey.is_module_patched("socket") else None


def _os_socket(sock: Any) -> Any:
    """The operating system's socket under a plain gevent socket (gevent keeps it
    non-blocking and waits for it itself), else ``sock``. A write that must not wait goes to
    it directly: gevent's ``send`` only wraps the same system call, and the hub writes each
    chunk to every waiting viewer (docs/performance.md, "The hub writes to the operating
    system's socket"). Only that exact class: a subclass such as gevent's ``SSLSocket``
    holds the same ``_sock``, but its writes must go through TLS."""
    if type(sock) is not gevent.socket.socket:
        return sock
    raw = getattr(sock, "_sock", None)
    return raw if isinstance(raw, _socket.socket) else sock


def _send_nowait(sock: Any, data: bytes) -> int:
    """send() that never waits: 0 when the socket would block (``sock`` is an operating
    system socket, blocking or not)."""
    try:
        return int(sock.send(data, socket.MSG_DONTWAIT))
    except (BlockingIOError, TimeoutError):
        return 0


def add_no_server_context_takeover(offers: str) -> str:
    """Rewrite each permessage-deflate offer so the server never keeps its compression
    context between messages."""
    out = []
    for offer in offers.split(","):
        params = [p.strip() for p in offer.split(";")]
        if params[0] == "permessage-deflate" and "server_no_context_takeover" not in params:
            params.append("server_no_context_takeover")
        out.append("; ".join(params))
    return ", ".join(out)


def upgrade_request(environ: dict[str, Any]) -> tuple[Request, bytes]:
    """The WebSocket upgrade request that the WSGI server parsed, checked as wsproto checks
    it (RFC 6455 4.2.1, with wsproto's messages): the request, and its Sec-WebSocket-Key."""

    def refuse(message: str) -> RemoteProtocolError:
        return RemoteProtocolError(message, event_hint=RejectConnection())

    if environ.get("REQUEST_METHOD") != "GET":
        raise refuse("Request method must be GET")
    if "upgrade" not in _tokens(environ.get("HTTP_CONNECTION", ""), lower=True):
        raise refuse("Missing header, 'Connection: Upgrade'")
    if environ.get("HTTP_SEC_WEBSOCKET_VERSION") != "13":
        raise refuse("Missing header, 'Sec-WebSocket-Version'")
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY")
    if key is None:
        raise refuse("Missing header, 'Sec-WebSocket-Key'")
    if environ.get("HTTP_UPGRADE", "").lower() != "websocket":
        raise refuse("Missing header, 'Upgrade: websocket'")
    if "HTTP_HOST" not in environ:
        raise refuse("Missing header, 'Host'")
    query = environ.get("QUERY_STRING", "")
    upgrade = Request(
        host=environ["HTTP_HOST"],
        target=environ.get("PATH_INFO", "/") + (f"?{query}" if query else ""),
        extensions=_tokens(environ.get("HTTP_SEC_WEBSOCKET_EXTENSIONS", "")),
        subprotocols=_tokens(environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", "")),
    )
    return upgrade, key.encode("latin-1")  # WSGI hands headers over as latin-1 text


def _tokens(value: str, lower: bool = False) -> list[str]:
    """A comma-separated header's items (a header sent twice arrives joined by a comma)."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    return [item.lower() for item in items] if lower else items


def accept_deflate(offers: list[str]) -> tuple[PerMessageDeflate, bytes] | None:
    """The first permessage-deflate offer that can be taken, with
    ``server_no_context_takeover`` added: wsproto's extension for the connection, and the
    reply's ``Sec-WebSocket-Extensions``. An offer with an invalid parameter is declined,
    and the next one tried (RFC 7692 5.1)."""
    for offer in offers:
        if offer.split(";", 1)[0].strip() != "permessage-deflate":
            continue
        extension = PerMessageDeflate()
        try:
            params = extension.accept(add_no_server_context_takeover(offer))
        except ValueError:  # a window size that is not a number
            continue
        if isinstance(params, str):
            return extension, b"permessage-deflate; " + params.encode("ascii")
    return None


class RelayServer(Server):  # type: ignore[misc]
    """A server-side WebSocket that sends pre-encoded frames (``send_batch``)."""

    environ: dict[str, Any]
    connected: bool
    pong_received: bool
    ping_interval: float | None
    receive_bytes: int

    def __init__(
        self,
        environ: dict[str, Any],
        *,
        compression: str = "auto",
        compress_min_bytes: int = 1024,
        **options: Any,
    ) -> None:
        self.compression = compression
        self.compress_min_bytes = compress_min_bytes
        self.deflate: Deflate | None = None
        # Under gevent the socket's readability wakes the viewer (an io watcher) instead of a
        # reader greenlet per connection: less memory per viewer, and a viewer can park.
        self.loop = gevent_loop()
        self.detached = False
        self._watch: Any = None
        self._unread: list[bytes] = []
        self._readable = False  # the watcher saw the client send something (or leave)
        self._on_readable: Callable[[], None] | None = None
        self._next_ping = 0.0
        if self.loop is not None:
            options["thread_class"] = _NoReader
        environ = dict(environ)
        for key in ("gunicorn.socket", "werkzeug.socket"):
            if key in environ:
                environ[key] = _WholeWrites(environ[key])
        super().__init__(environ, **options)
        self._next_ping = time.monotonic() + (self.ping_interval or 0)
        self.environ = {}  # the handshake is done: nothing reads it again

    def handshake(self) -> None:
        """RFC 6455's opening handshake, answered from the request the WSGI server parsed.
        simple-websocket rebuilds the request as text for wsproto, which parses it again
        with h11 and writes its reply with h11: nine tenths of a connection's setup
        (docs/performance.md). The checks are wsproto's, the reply is the one it wrote, and
        the connection after the handshake is wsproto's own."""
        upgrade, key = upgrade_request(self.environ)
        self.subprotocol = self.choose_subprotocol(upgrade)
        reply = [_SWITCHING, b"Sec-WebSocket-Accept: " + generate_accept_token(key)]
        if self.subprotocol is not None:
            reply.append(b"Sec-WebSocket-Protocol: " + self.subprotocol.encode("ascii"))
        offers = [offer for offer in upgrade.extensions if isinstance(offer, str)]
        accepted = accept_deflate(offers) if self.compression != "off" else None
        extensions: list[Extension] = []
        if accepted is not None:
            extension, params = accepted
            reply.append(b"Sec-WebSocket-Extensions: " + params)
            extensions.append(extension)
            self.deflate = Deflate(window_bits=extension.server_max_window_bits,
                                   min_bytes=self.compress_min_bytes)  # fmt: skip
        self.ws = Connection(ConnectionType.SERVER, extensions)
        self.sock.send(b"\r\n".join(reply) + b"\r\n\r\n")
        self.connected = True

    def send_batch(self, batch: Batch, batched: bool) -> None:
        """Send a batch's messages, encoded once for every connection alike."""
        self.send_bytes(self.frames(batch, batched))

    def frames(self, batch: Batch | Notice, batched: bool) -> bytes:
        """A batch's messages as this connection's WebSocket frames."""
        return batch.ws_bytes(batched, self.deflate)

    def send_bytes(self, frames: bytes) -> None:
        if not self.connected:
            raise ConnectionClosed(self.close_reason, self.close_message)
        try:
            self.sock.sendall(frames)
        except OSError:
            self.connected = False
            raise ConnectionClosed(self.close_reason, self.close_message) from None

    # -- reading without a reader thread (gevent) ------------------------------------------

    @property
    def watched(self) -> bool:
        """Whether the socket is read here (``pump``) rather than by a reader thread."""
        return self.loop is not None

    def arm(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` (once) when the client sends something or goes away. A lone pong
        (the answer to our keepalive ping) is taken in right away, without waking anyone."""
        if self.loop is None or not self.connected:
            return
        self._on_readable = wake
        if self._watch is None:
            self._watch = self.loop.io(self.sock.fileno(), 1)  # 1: readable
        if not self._watch.active:

            def readable() -> None:
                if not self._took_pong():
                    self._watch.stop()  # one-shot: a level-triggered watcher would spin
                    self._readable = True
                    wake()

            self._watch.start(readable)

    def disarm(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch.close()
            self._watch = None

    def _took_pong(self) -> bool:
        """Read what arrived; True if it was just a pong. Anything else waits in ``_unread``
        for ``pump``."""
        data = self._recv_nowait()
        if data is None:
            return True  # nothing after all
        if _is_lone_pong(data) and not self._unread:
            self.pong_received = True
            return True
        self._unread.append(data)
        return False

    def _recv_nowait(self) -> bytes | None:
        """One read without waiting: the bytes, b"" when the client has gone, None when
        there is nothing."""
        sock = self.sock
        timeout = sock.gettimeout()
        sock.settimeout(0.0)  # gevent: fail instead of waiting (this may run in its hub)
        try:
            return bytes(sock.recv(self.receive_bytes))
        except (BlockingIOError, TimeoutError):
            return None
        except OSError:
            return b""
        finally:
            sock.settimeout(timeout)

    def pump(self) -> None:
        """Take in what the client sent, without waiting (replies to pings and closes as
        simple-websocket's reader would, and queues messages in ``input_buffer``)."""
        if self.loop is None or not self._readable:
            return  # nothing arrived since the socket's watcher last looked
        self._readable = False
        while self.connected:
            data = self._unread.pop(0) if self._unread else self._recv_nowait()
            if data is None:
                break  # all read
            if not data:
                self.connected = False
                return
            self.ws.receive_data(data)
            try:
                self.connected = self._handle_events()
            except OSError:  # its answer to a ping or a close met a client that had gone
                self.connected = False
                return
        if self._on_readable is not None:
            self.arm(self._on_readable)

    def client_messages(self) -> Iterator[str | None]:
        """Take in what the client sent: the ``type`` of each JSON object message waiting
        (None for anything else), after the ping due; ConnectionClosed once it has gone."""
        self.pump()
        if not self.connected:
            raise ConnectionClosed(self.close_reason, self.close_message)
        self.keepalive()
        while self.input_buffer and (raw := self.receive(timeout=0)) is not None:
            try:
                message = json.loads(raw)
                yield message.get("type") if isinstance(message, dict) else None
            except (ValueError, TypeError, RecursionError):  # not JSON, or nested too deep
                yield None

    def keepalive(self) -> None:
        """Ping every ``ping_interval``; close a client that did not answer the last one."""
        if self.loop is None or not self.ping_interval or time.monotonic() < self._next_ping:
            return
        if not self.pong_received:
            self.close(1008, "Ping/Pong timeout")
            raise ConnectionClosed(self.close_reason, self.close_message)
        self.pong_received = False
        self.send_bytes(_PING)
        self._next_ping = time.monotonic() + self.ping_interval

    def ping_now(self) -> bool:
        """For a parked viewer's timer: ping without waiting if the last ping was answered
        (True), else leave it to ``keepalive`` in the viewer (False)."""
        if not self.ping_interval or time.monotonic() < self._next_ping:
            return True
        if not self.pong_received or not isinstance(self.sock, _WholeWrites):
            return False
        if not self.sock.try_send(_PING):
            return False
        self.pong_received = False
        self._next_ping = time.monotonic() + self.ping_interval
        return True

    def until_keepalive(self) -> float:
        if not self.ping_interval:
            return 3600.0
        return max(0.0, self._next_ping - time.monotonic())

    def detach(self) -> None:
        """Keep the connection open on a socket of its own, so the WSGI request can end
        (the server closes its socket object when the request returns)."""
        if isinstance(self.sock, _WholeWrites):
            self.disarm()  # its watcher watches the old descriptor
            self.sock.adopt_dup()
            self.detached = True

    def flush(self) -> None:
        """Write what a direct write left in the backlog."""
        if isinstance(self.sock, _WholeWrites) and self.sock.backlog:
            self.send_bytes(b"")

    def finish(self) -> None:
        """End the connection the way RFC 6455 (7.1.1) asks of a server: after its close
        frame, wait (up to ``LINGER_S``) for the client to answer and close its end, reading
        and dropping what it sends, before the socket is closed. Closing at once with the
        client's pong or close still unread sends a TCP reset; a client whose own reply then
        fails may drop frames it had received but not yet handed on (websockets' sync client
        lost the final ``done`` that way). Our side is half-closed first, so the client sees
        the end of the stream right after the close frame."""
        if getattr(self, "_finished", False):
            return
        self._finished = True
        if self.loop is None:  # a reader thread reads the socket: it ends at the client's close
            with contextlib.suppress(Exception):
                self.sock.shutdown(socket.SHUT_WR)
                self.thread.join(LINGER_S)
            return
        sock = self.sock
        deadline = time.monotonic() + LINGER_S
        try:
            sock.shutdown(socket.SHUT_WR)
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                if not sock.recv(4096):
                    break  # the client closed its end
        except (OSError, TimeoutError):
            pass  # gone already, or it never answered: close anyway

    def direct_writer(self, batched: bool) -> Callable[[Batch], bool] | None:
        """For the hub: write a batch to this socket now if that needs no waiting."""
        sock = self.sock
        if not isinstance(sock, _WholeWrites) or not self.connected:
            return None
        deflate = self.deflate

        def write(batch: Batch) -> bool:
            if not sock.try_send(batch.ws_bytes(batched, deflate)):
                return False
            if sock.backlog:
                self.event.set()  # the viewer writes the rest
            return True

        return write


Handler = Callable[..., None]


class RelaySock(Sock):  # type: ignore[misc]
    """flask-sock, building ``RelayServer`` connections (options: SOCK_SERVER_OPTIONS)."""

    def route(self, path: str, bp: Any = None, **kwargs: Any) -> Callable[[Handler], None]:
        def decorator(handler: Handler) -> None:
            @wraps(handler)
            def websocket_route(*args: Any, **kw: Any) -> Response:
                options = current_app.config.get("SOCK_SERVER_OPTIONS", {})
                try:
                    ws = RelayServer(request.environ, **options)
                except RemoteProtocolError as exc:  # nothing was sent yet: answer over HTTP
                    raise BadRequest(f"not a valid WebSocket handshake: {exc}") from None
                try:
                    handler(ws, *args, **kw)
                except ConnectionClosed:
                    pass
                except Exception:
                    # After the upgrade the socket speaks WebSocket: an error must become a
                    # close frame, never an HTTP error page written into the stream.
                    log.exception("WebSocket handler failed")
                    with contextlib.suppress(Exception):
                        ws.close(CLOSE_INTERNAL_ERROR, "internal error")
                if not ws.detached:  # a parked viewer lives on after the request
                    with contextlib.suppress(Exception):  # already closed by either side
                        ws.close()
                    ws.finish()
                return _finished(ws)

            kwargs["websocket"] = True
            target = bp or self.app
            target.route(path, **kwargs)(websocket_route)

        return decorator


def _finished(ws: RelayServer) -> Response:
    """The WSGI response after the socket was taken over (what flask-sock returns)."""

    class WebSocketResponse(Response):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            if ws.mode == "gunicorn":
                raise StopIteration()
            if ws.mode == "werkzeug":
                return super().__call__(*args, **kwargs)
            return []

    return WebSocketResponse()
