"""WebSocket compression against the real server, read frame by frame from a raw socket."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import zlib
from dataclasses import dataclass
from typing import Any

import pytest

from tests.client import Client, chunk_text, expand, wait_for
from tests.conftest import Stack
from tests.procs import ROOT

OFFER = "permessage-deflate; client_max_window_bits"


@dataclass
class Frame:
    compressed: bool
    opcode: int
    payload: bytes


def handshake(port: int, path: str, cookie: str, extensions: str | None) -> tuple[Any, str]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
        "Sec-WebSocket-Version: 13",
        f"Cookie: {cookie}",
    ]
    if extensions:
        lines.append(f"Sec-WebSocket-Extensions: {extensions}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    reader = sock.makefile("rb")
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += reader.read(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return (sock, reader), head.decode()


def frames(reader: Any) -> list[Frame]:
    """Every frame up to and including the close frame."""
    out = []
    while True:
        b0, b1 = reader.read(2)
        size = b1 & 0x7F
        if size == 126:
            size = int.from_bytes(reader.read(2), "big")
        elif size == 127:
            size = int.from_bytes(reader.read(8), "big")
        frame = Frame(bool(b0 & 0x40), b0 & 0x0F, reader.read(size))
        out.append(frame)
        if frame.opcode == 8:
            return out


def messages(received: list[Frame]) -> list[dict[str, Any]]:
    out = []
    for frame in received:
        if frame.opcode != 1:
            continue
        data = frame.payload
        if frame.compressed:  # a fresh decompressor each time: no context is kept
            data = zlib.decompressobj(-15).decompress(data + b"\x00\x00\xff\xff")
        out.append(json.loads(data))
    return out


def read_stream(port: int, client: Client, sid: str, extensions: str | None) -> Any:
    cookie = "; ".join(f"{k}={v}" for k, v in client.http.cookies.items())
    (sock, reader), head = handshake(port, f"/api/v1/streams/{sid}/ws?batch=1", cookie, extensions)
    try:
        return head, frames(reader)
    finally:
        reader.close()
        sock.close()


def test_large_messages_are_compressed_small_ones_are_not(client: Client, stack: Stack) -> None:
    posted = client.post_chat("Compress the catch-up [demo:words=400]")
    sid = posted["streamId"]
    plain = client.attach(sid)  # the whole answer, one message per event
    head, received = read_stream(stack.port, client, sid, OFFER)
    assert "permessage-deflate" in head and "server_no_context_takeover" in head
    data = [f for f in received if f.opcode == 1]
    assert any(f.compressed for f in data)  # the catch-up batches
    assert all(f.compressed == (len(m) >= 1024) for f, m in _with_sizes(data))
    assert expand(messages(received)) == plain.events


def test_compression_off_is_never_negotiated(client: Client, stack: Stack) -> None:
    posted = client.post_chat("No compression [demo:words=200]")
    sid = posted["streamId"]
    plain = client.attach(sid)
    proc, port = stack.start_web_with(RELAY_WS_COMPRESSION="off")
    try:
        head, received = read_stream(port, client, sid, OFFER)
    finally:
        proc.stop()
    assert "sec-websocket-extensions" not in head.lower()
    assert not any(f.compressed for f in received)
    assert expand(messages(received)) == plain.events


@pytest.mark.parametrize(
    "offer", [None, "permessage-deflate; client_max_window_bits=abc"], ids=["none", "bad"]
)
def test_a_client_that_offers_nothing_gets_plain_frames(
    client: Client, stack: Stack, offer: str | None
) -> None:
    """Nothing offered, or an offer with an invalid parameter, which is declined (RFC 7692
    5.1; wsproto's handshake raised ValueError on it: a 500 instead of the upgrade)."""
    posted = client.post_chat("Plain frames [demo:words=200]")
    sid = posted["streamId"]
    plain = client.attach(sid)
    head, received = read_stream(stack.port, client, sid, offer)
    assert "sec-websocket-extensions" not in head.lower()
    assert not any(f.compressed for f in received)
    assert expand(messages(received)) == plain.events


# -- the opening handshake, in process, against wsproto's own ----------------------------------

BROWSER_HEADERS = {
    "HTTP_HOST": "relay.example:8000",
    "HTTP_CONNECTION": "keep-alive, Upgrade",
    "HTTP_UPGRADE": "websocket",
    "HTTP_SEC_WEBSOCKET_VERSION": "13",
    "HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ==",
    "HTTP_ORIGIN": "http://relay.example:8000",
    "HTTP_COOKIE": "relay_session=abc",
    "HTTP_USER_AGENT": "Mozilla/5.0",
}


def wsgi_upgrade(sock: socket.socket, **changes: str | None) -> dict[str, Any]:
    """A WSGI environ of a browser's upgrade request (``None`` removes a header)."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/api/v1/streams/s/ws",
        "QUERY_STRING": "batch=1",
        "gunicorn.socket": sock,
        **BROWSER_HEADERS,
    }
    for key, value in changes.items():
        environ.pop(key, None) if value is None else environ.__setitem__(key, value)
    return environ


def wsproto_reply(environ: dict[str, Any]) -> bytes:
    """What wsproto's own handshake answers the same request, as simple-websocket drove it
    (the offers rewritten with server_no_context_takeover, as relay did before)."""
    from wsproto import WSConnection
    from wsproto.connection import ConnectionType
    from wsproto.events import AcceptConnection, Request
    from wsproto.extensions import PerMessageDeflate

    from web.websocket import add_no_server_context_takeover

    lines = [f"{environ['REQUEST_METHOD']} {environ['PATH_INFO']} HTTP/1.1"]
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            if key == "HTTP_SEC_WEBSOCKET_EXTENSIONS":
                value = add_no_server_context_takeover(value)
            lines.append(f"{key[5:].replace('_', '-')}: {value}")
    connection = WSConnection(ConnectionType.SERVER)
    connection.receive_data(("\r\n".join(lines) + "\r\n\r\n").encode())
    [request] = connection.events()
    assert isinstance(request, Request)
    return connection.send(AcceptConnection(extensions=[PerMessageDeflate()]))


def relay_reply(environ: dict[str, Any], peer: socket.socket, **options: Any) -> tuple[Any, bytes]:
    """relay's connection for the request, and the reply it wrote."""
    from web.websocket import RelayServer

    ws = RelayServer(environ, **options)
    peer.settimeout(10)
    reply = b""
    while not reply.endswith(b"\r\n\r\n"):
        reply += peer.recv(4096)
    return ws, reply


def parsed(reply: bytes) -> tuple[str, dict[str, str]]:
    status, *lines = reply.decode().strip().split("\r\n")
    return status, {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


OFFERS = [
    None,
    "permessage-deflate; client_max_window_bits",  # Chrome, Python's websockets
    "permessage-deflate",  # Firefox, Node's ws without parameters
    "permessage-deflate; server_max_window_bits=10; client_max_window_bits=12",
    "x-webkit-deflate-frame, permessage-deflate; client_no_context_takeover",
    "permessage-deflate; server_no_context_takeover",
]


@pytest.mark.parametrize("offer", OFFERS)
def test_the_handshake_replies_as_wsproto_would(offer: str | None) -> None:
    """relay answers the upgrade from the request the WSGI server parsed (wsproto parsed a
    rebuilt copy of it again): the same status, accept token and extensions as wsproto's
    handshake, and a connection whose compression is what the reply says."""
    server, peer = socket.socketpair()
    try:
        environ = wsgi_upgrade(server, HTTP_SEC_WEBSOCKET_EXTENSIONS=offer)
        ws, reply = relay_reply(environ, peer, compress_min_bytes=100)
        expected = parsed(wsproto_reply(environ))
        assert parsed(reply) == expected
        assert expected[1]["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455
        negotiated = expected[1].get("sec-websocket-extensions")
        if negotiated is None:
            assert ws.deflate is None
        else:
            bits = 10 if "server_max_window_bits=10" in negotiated else 15
            assert (ws.deflate.window_bits, ws.deflate.min_bytes) == (bits, 100)
            assert "server_no_context_takeover" in negotiated
        # wsproto's connection reads what the client sends, compressed or not
        mask = b"\x01\x02\x03\x04"
        payload = b"hi"
        if ws.deflate is not None:
            compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
            payload = (compressor.compress(b"hi") + compressor.flush(zlib.Z_SYNC_FLUSH))[:-4]
        first = 0x81 | (0x40 if ws.deflate is not None else 0)
        masked = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
        peer.sendall(bytes([first, 0x80 | len(payload)]) + mask + masked)
        assert ws.receive(timeout=10) == "hi"
        ws.close()
    finally:
        peer.close()
        server.close()


@pytest.mark.parametrize(
    "changes",
    [
        {"REQUEST_METHOD": "POST"},
        {"HTTP_CONNECTION": None},
        {"HTTP_CONNECTION": "keep-alive"},
        {"HTTP_SEC_WEBSOCKET_VERSION": None},
        {"HTTP_SEC_WEBSOCKET_VERSION": "8"},
        {"HTTP_SEC_WEBSOCKET_KEY": None},
        {"HTTP_UPGRADE": "h2c"},
        {"HTTP_HOST": None},
    ],
    ids=lambda changes: ",".join(f"{k}={v}" for k, v in changes.items()),
)
def test_a_bad_upgrade_is_refused_as_wsproto_refuses_it(changes: dict[str, str | None]) -> None:
    """Nothing is written: the route answers it over HTTP with a 400 (tests/test_openapi.py)."""
    from wsproto.utilities import RemoteProtocolError

    from web.websocket import RelayServer

    server, peer = socket.socketpair()
    try:
        environ = wsgi_upgrade(server, **changes)
        with pytest.raises(RemoteProtocolError) as theirs:
            if environ["REQUEST_METHOD"] != "GET":  # simple-websocket always wrote GET
                raise RemoteProtocolError("Request method must be GET")
            wsproto_reply(environ)
        with pytest.raises(RemoteProtocolError) as ours:
            RelayServer(environ)
        if "HTTP_HOST" in environ:  # without it h11 refuses the request before wsproto looks
            assert str(ours.value) == str(theirs.value)
        peer.setblocking(False)
        with pytest.raises(BlockingIOError):
            peer.recv(1)
    finally:
        peer.close()
        server.close()


def test_the_first_offer_that_can_be_taken_is_taken() -> None:
    """RFC 7692 5.1: a server declines an offer with an invalid parameter, and a client
    lists its offers in order of preference."""
    from web.websocket import accept_deflate

    assert accept_deflate(["permessage-deflate; client_max_window_bits=abc"]) is None
    assert accept_deflate(["permessage-deflate; server_max_window_bits=7"]) is None
    assert accept_deflate(["x-webkit-deflate-frame"]) is None
    taken = accept_deflate([
        "permessage-deflate; client_max_window_bits=8",
        "permessage-deflate; server_max_window_bits=12",
        "permessage-deflate; server_max_window_bits=9",
    ])  # fmt: skip
    assert taken is not None
    extension, params = taken
    assert params == b"permessage-deflate; server_no_context_takeover; server_max_window_bits=12"
    assert extension.server_max_window_bits == 12 and extension.server_no_context_takeover


def _with_sizes(data: list[Frame]) -> list[tuple[Frame, bytes]]:
    """Each data frame with its uncompressed payload."""
    out = []
    for frame in data:
        payload = frame.payload
        if frame.compressed:
            payload = zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")
        out.append((frame, payload))
    return out


def test_a_direct_write_that_would_block_keeps_the_rest_in_order() -> None:
    direct_writes_keep_order()


# The same under gevent, where a direct write goes to the operating system's socket under
# gevent's (non-blocking: the kernel's answer is final, gevent never waits).
UNDER_GEVENT = """
import gevent.monkey
gevent.monkey.patch_all()
import _socket, socket
from tests.test_websocket import direct_writes_keep_order
from web.websocket import _os_socket
print(direct_writes_keep_order().startswith("gevent"))
ours, _ = socket.socketpair()
raw = _os_socket(ours)
print(raw is not ours and isinstance(raw, _socket.socket) and raw.fileno() == ours.fileno())
import ssl
tls = ssl.create_default_context().wrap_socket(ours, server_hostname="relay.test",
                                               do_handshake_on_connect=False)
print(_os_socket(tls) is tls)  # TLS: never the socket under it
"""


def test_direct_writes_under_gevent_keep_the_rest_in_order() -> None:
    out = subprocess.run(
        [sys.executable, "-c", UNDER_GEVENT], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "True"]


def direct_writes_keep_order() -> str:
    """Fill a socket with direct writes until the kernel takes no more, then write through
    the backlog: everything arrives once, in order. Returns the socket's module."""
    from web.websocket import _WholeWrites

    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writes = _WholeWrites(server)
    sent = b""
    for n in range(10_000):  # until the kernel takes no more
        data = bytes([65 + n % 26]) * 1000
        if not writes.try_send(data):
            break
        sent += data
    else:
        raise AssertionError("the socket never filled up")
    assert writes.backlog  # the kernel took the last accepted write in part: the rest waits
    assert not writes.try_send(b"never")  # and nothing jumps it
    received = bytearray()

    def drain() -> None:
        client.settimeout(10)
        while len(received) < len(sent) + 5:
            received.extend(client.recv(65536))

    reader = threading.Thread(target=drain)
    reader.start()
    writes.send(b"after")  # the backlog goes first, then this
    reader.join(15)
    assert bytes(received) == sent + b"after"
    server.close()
    client.close()
    return type(server).__module__


# -- waiting viewers park: they hold no request while they wait --------------------------------


def test_waiting_viewers_hold_no_request(isolated_stack: Stack) -> None:
    stack = isolated_stack
    client = stack.client()
    posted = client.post_chat("Many waiting viewers [demo:words=30]")  # no worker yet: queued
    sid = posted["streamId"]
    proc, port = stack.start_web_with(connections=10)  # gunicorn serves 10 requests at once
    watcher = Client(f"http://127.0.0.1:{port}")
    watcher.http.cookies.update(client.http.cookies)
    try:
        with contextlib.ExitStack() as opened:
            path = f"/api/v1/streams/{sid}/ws?batch=1"
            sockets = [opened.enter_context(watcher.connect_ws(path)) for _ in range(40)]
            # Forty viewers wait on a server that serves ten requests at once, and it still
            # answers a plain request: none of them holds one.
            assert watcher.request("GET", f"/api/v1/streams/{sid}").status_code == 200
            stack.start_worker("w1")
            for ws in sockets:
                events = expand([json.loads(raw) for raw in ws])
                ended = (events[-1]["type"], ws.close_code, ws.close_reason)
                assert ended == ("done", 1000, "stream ended"), (ended, len(events))
                assert chunk_text(events) == client.answer(posted["chatId"])["content"]
    finally:
        proc.stop()


def test_a_client_that_answers_no_ping_is_closed(isolated_stack: Stack) -> None:
    stack = isolated_stack
    client = stack.client()
    sid = client.post_chat("Nobody answers [demo:words=5]")["streamId"]
    proc, port = stack.start_web_with(RELAY_WS_PING_S="0.3")
    try:
        cookie = "; ".join(f"{k}={v}" for k, v in client.http.cookies.items())
        (sock, reader), _ = handshake(port, f"/api/v1/streams/{sid}/ws", cookie, None)
        received = frames(reader)  # a raw socket: it never answers a ping
        sock.close()
    finally:
        proc.stop()
    assert [f.opcode for f in received] == [9, 8]  # one ping, then the close
    assert int.from_bytes(received[-1].payload[:2], "big") == 1008


def test_a_client_that_answers_pings_stays_attached(isolated_stack: Stack) -> None:
    stack = isolated_stack
    client = stack.client()
    posted = client.post_chat("Keep me [demo:words=20]")
    proc, port = stack.start_web_with(RELAY_WS_PING_S="0.3")
    try:
        watcher = Client(f"http://127.0.0.1:{port}")
        watcher.http.cookies.update(client.http.cookies)
        with watcher.connect_ws(f"/api/v1/streams/{posted['streamId']}/ws") as ws:
            with pytest.raises(TimeoutError):
                ws.recv(timeout=2.0)  # ~6 pings answered (websockets does it), nothing sent
            stack.start_worker("w1")
            events = [json.loads(ws.recv(timeout=30))]
            while events[-1]["type"] != "done":
                events.append(json.loads(ws.recv(timeout=30)))
    finally:
        proc.stop()
    assert chunk_text(events) == client.answer(posted["chatId"])["content"]


def test_a_waiting_viewer_that_leaves_is_forgotten(isolated_stack: Stack) -> None:
    stack = isolated_stack
    client = stack.client()
    sid = client.post_chat("Leave me [demo:words=5]")["streamId"]
    with contextlib.ExitStack() as opened:
        sockets = [opened.enter_context(client.connect_ws(f"/api/v1/streams/{sid}/ws"))
                   for _ in range(5)]  # fmt: skip
        wait_for(lambda: viewers_connected(client) == 5)
        for ws in sockets:
            ws.socket.close()  # gone without a close frame
        wait_for(lambda: viewers_connected(client) == 0)


def viewers_connected(client: Client) -> float:
    text = client.request("GET", "/metrics").text
    line = next(
        ln for ln in text.splitlines() if ln.startswith('relay_viewers_connected{transport="ws"')
    )
    return float(line.rsplit(" ", 1)[1])


def test_viewers_that_vanish_mid_answer_are_not_server_errors(isolated_stack: Stack) -> None:
    """A viewer whose connection is reset while its answer streams (a phone losing signal)
    is a normal event: no error, no traceback, no 500 in the web process's log."""
    stack = isolated_stack
    stack.start_worker("w1")
    client = stack.client()
    sid = client.post_chat("Vanishing viewers [demo:words=300]")["streamId"]
    cookie = "; ".join(f"{k}={v}" for k, v in client.http.cookies.items())
    for _ in range(3):
        (sock, reader), _head = handshake(stack.port, f"/api/v1/streams/{sid}/ws", cookie, None)
        reader.read(2)  # the first frame has started: the viewer is being written to
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reader.close()
        sock.close()  # linger 0: a reset, no close frame
    assert client.attach(sid).last["type"] == "done"  # the server wrote on after the resets
    wait_for(lambda: viewers_connected(client) == 0)
    log = stack.web.output()
    assert "Traceback" not in log and "ERROR" not in log and '" 500 ' not in log, log[-3000:]


# A client that pings and leaves at once: the pong meets a closed socket (EPIPE).
PING_AND_LEAVE = """
import gevent.monkey
gevent.monkey.patch_all()
import os, socket, gevent
from simple_websocket import ConnectionClosed
from web.websocket import RelayServer
ours, theirs = socket.socketpair()
environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "HTTP_HOST": "localhost",
           "HTTP_UPGRADE": "websocket", "HTTP_CONNECTION": "Upgrade",
           "HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ==",
           "HTTP_SEC_WEBSOCKET_VERSION": "13", "gunicorn.socket": ours}
ws = RelayServer(environ)
assert theirs.recv(65536).startswith(b"HTTP/1.1 101")
woke = []
ws.arm(lambda: woke.append(True))
theirs.sendall(bytes([0x89, 0x80]) + os.urandom(4))  # a masked ping, no payload
theirs.close()
gevent.sleep(0.1)
try:
    print(woke, list(ws.client_messages()))
except ConnectionClosed:
    print(woke, "closed")
"""


def test_a_client_gone_before_the_answer_to_its_ping_ends_the_connection_cleanly() -> None:
    """The viewer's read of what the client sent answers its ping; the client has gone, so
    the answer fails with EPIPE: that is the client leaving (ConnectionClosed, the viewer
    ends quietly), not a failure of ours (an error logged and a 1011 close)."""
    out = subprocess.run(
        [sys.executable, "-c", PING_AND_LEAVE], cwd=ROOT, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[True]", "closed"]
