"""The web tier under a burst: a thousand viewers attaching at once to one answer wait for a
(deliberately tiny) Redis pool instead of being told Redis is down; once Redis really is
down, a new attach is told so at once.

The answer's log has expired, so it is served from SQL: the burst that used to end with
1013 "Redis is not answering" for most viewers (each rebuilt the answer from SQL, the event
loop stayed busy for longer than the pool's 20 s wait, and the viewers queued for a Redis
connection gave up, with no outage anywhere). The viewers are asyncio clients in a
subprocess (``main`` below), so the test process does not have to keep up with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import subprocess
import sys
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import websockets

from models import keys, store
from models.db import make_engine, make_sessionmaker
from ops.redis_server import EmbeddedRedis, free_port
from tests.client import Client
from tests.conftest import Stack, migrated_database, stack_env
from tests.procs import ROOT, start_web

VIEWERS = 1000  # half over WebSocket, half over SSE, all at once
CHUNKS = 10_000  # rebuilding this from SQL for each viewer took the loop ~50 ms
TERMINALS = {"done", "cancelled", "error"}

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def burst_stack(tmp_path: Path) -> Iterator[tuple[Stack, EmbeddedRedis]]:
    """A web process with a Redis pool of 5 connections, on a Redis of this test's own (the
    test stops it). No worker: the stream is ended directly (``finished_long_ago``)."""
    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        with migrated_database("sqlite", tmp_path) as database_url:
            env = stack_env(server.url, database_url)
            env.update(
                RELAY_REDIS_MAX_CONNECTIONS="5",
                # Far above any wait of this burst: an attach that really waited for the
                # pool would outlast the client's timeout below, and fail the test.
                RELAY_REDIS_POOL_WAIT_S="600",
            )
            port = free_port()
            stack = Stack(env, tmp_path, port, start_web(env, port, tmp_path), [])
            try:
                yield stack, server
            finally:
                stack.stop()
    finally:
        server.stop()


def test_a_burst_of_viewers_waits_for_redis_and_a_dead_redis_is_reported_at_once(
    burst_stack: tuple[Stack, EmbeddedRedis],
) -> None:
    stack, server = burst_stack
    client = stack.client()
    sid, text, last_seq = finished_long_ago(stack, client, CHUNKS)

    results = burst(stack, client, sid, VIEWERS)

    digest = hashlib.sha256(text.encode()).hexdigest()
    redials = sum(r.pop("redials", 0) for r in results)
    failed = [r for r in results if r != complete(last_seq, digest, r["transport"])]
    print(f"{redials} connections dropped by gunicorn before their request was read")
    assert redials == 0  # gunicorn.conf.py keepalive: a busy loop must not drop handshakes
    assert not failed, f"{len(failed)} of {len(results)} viewers failed, e.g. {failed[:3]}"
    assert "backend unavailable" not in stack.web.output()

    server.stop()  # Redis is really down now: a new attach is told so, without waiting
    down = client.attach(sid, timeout=60)
    assert (down.close_code, down.events) == (1013, [])
    assert down.close_reason == "Redis is not answering; try again shortly"
    resp = client.request("GET", f"/api/v1/streams/{sid}/events", timeout=60)
    assert resp.status_code == 200  # the response had started when Redis was first needed
    assert resp.text == "retry: 1000\n\n: Redis is not answering; try again shortly\n\n"
    log = stack.web.output()
    assert "ERROR" not in log and "Traceback" not in log, log[-3000:]


def finished_long_ago(stack: Stack, client: Client, chunks: int) -> tuple[str, str, int]:
    """A stream that ended (done) and whose log has expired, so SQL serves it: posted with no
    worker running, ended in SQL as a worker would end it, its Redis keys removed. Returns
    its ID, text and last seq."""
    sid = client.post_chat("an old answer")["streamId"]
    pieces = [f"piece {i} " for i in range(chunks)]
    text = "".join(pieces)
    layout: list[Any] = list(itertools.accumulate(map(len, pieces)))  # each chunk's end
    engine = make_engine(stack.env["DATABASE_URL"])
    try:
        with make_sessionmaker(engine)() as db:
            assert store.finalize(db, sid, status="done", text=text, layout=layout, attempt=None)
    finally:
        engine.dispose()
    stack.redis().delete(keys.log_key(sid), keys.state_key(sid))
    assert client.stream(sid)["lastSeq"] == chunks + 1  # the chunks, then done
    return sid, text, chunks + 1


def complete(last_seq: int, digest: str, transport: str) -> dict[str, Any]:
    """What a viewer that got every event exactly once reports (see ``summary``)."""
    code = 1000 if transport == "ws" else 200
    return {"transport": transport, "code": code, "seqs": [1, last_seq], "end": "done",
            "ordered": True, "sha256": digest}  # fmt: skip


def burst(stack: Stack, client: Client, sid: str, viewers: int) -> list[dict[str, Any]]:
    """Attach ``viewers`` at once (half over WebSocket, half over SSE) from a subprocess."""
    cookie = "; ".join(f"{k}={v}" for k, v in client.http.cookies.items())
    args = [sys.executable, "-m", "tests.test_burst", str(stack.port), sid, cookie, str(viewers)]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    results: list[dict[str, Any]] = json.loads(out.stdout)
    assert len(results) == viewers
    return results


# -- the viewers (run in a subprocess) ---------------------------------------------------------


def summary(transport: str, code: int | None, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """One viewer's account: close code (HTTP status for SSE), the first and last seq, the
    last event's type, whether the seqs ran 1, 2, 3, ... without a gap or a repeat, and the
    hash of the text."""
    seqs: list[int] = []
    text: list[str] = []
    end = None
    for m in messages:
        if m["type"] == "chunks":
            seqs += range(m["seq"], m["seq"] + len(m["texts"]))
            text += m["texts"]
        else:
            seqs.append(m["seq"])
            text.append(m.get("text", "") if m["type"] == "chunk" else "")
        end = m["type"]
    return {
        "transport": transport,
        "code": code,
        "seqs": [seqs[0], seqs[-1]] if seqs else [],
        "end": end,
        "ordered": seqs == list(range(1, len(seqs) + 1)),
        "sha256": hashlib.sha256("".join(text).encode()).hexdigest(),
    }


class Dropped(Exception):
    """The server closed (or reset) a new connection without answering (``redialling``)."""


async def ws_viewer(url: str, cookie: str) -> dict[str, Any]:
    messages: list[dict[str, Any]] = []
    opened = False
    try:
        async with websockets.connect(
            url,
            additional_headers={"Cookie": cookie},
            compression=None,  # the client's CPU is the bottleneck here, not the wire
            open_timeout=120,
            close_timeout=30,
            max_size=None,
            ping_interval=None,
        ) as ws:
            opened = True
            with contextlib.suppress(websockets.ConnectionClosed):  # its code is kept
                async for raw in ws:
                    messages.append(json.loads(raw))
        code = ws.close_code
    except (OSError, TimeoutError, websockets.WebSocketException) as exc:
        cause = exc.__cause__ if isinstance(exc, websockets.InvalidMessage) else exc
        if not opened and isinstance(cause, EOFError | ConnectionResetError):
            raise Dropped from exc
        return {"transport": "ws", "code": None, "error": repr(exc)}
    return summary("ws", code, messages)


async def sse_viewer(port: int, path: str, cookie: str) -> dict[str, Any]:
    head = b""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nCookie: {cookie}\r\n"
            "Accept: text/event-stream\r\nConnection: close\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.read()
        writer.close()
    except (OSError, asyncio.IncompleteReadError) as exc:
        unanswered = isinstance(exc, ConnectionResetError) or (
            isinstance(exc, asyncio.IncompleteReadError) and not exc.partial
        )
        if unanswered and not head:
            raise Dropped from exc
        return {"transport": "sse", "code": None, "error": repr(exc)}
    if b"transfer-encoding: chunked" in head.lower():
        try:
            body = dechunk(body)
        except ValueError:  # the server broke off the response
            return {"transport": "sse", "code": int(head.split()[1]), "error": "cut short"}
    messages = [
        json.loads(line[len("data: ") :])
        for line in body.decode().split("\n")
        if line.startswith("data: ")
    ]
    return summary("sse", int(head.split()[1]), messages)


async def redialling(
    start: asyncio.Event, attach: Callable[[], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """Attach when ``start`` is set; dial again, as a browser would, when the server closed
    the connection before reading the request. gunicorn does that to a connection whose
    request it has not read within its ``keepalive`` (2 s by default): under a burst the
    event loop can be that late. The count is reported, not judged: it is gunicorn's
    setting (gunicorn.conf.py), not the pools' waits, that decides it."""
    await start.wait()
    for redials in range(5):
        with contextlib.suppress(Dropped):
            return {**await attach(), "redials": redials}
    return {"transport": "?", "code": None, "error": "dropped 5 times"}


def dechunk(body: bytes) -> bytes:
    """The body of a chunked response (ValueError if it ends before its last chunk)."""
    out = bytearray()
    at = 0
    while True:
        eol = body.index(b"\r\n", at)
        size = int(body[at:eol], 16)
        if size == 0:
            return bytes(out)
        out += body[eol + 2 : eol + 2 + size]
        at = eol + 2 + size + 2


async def attach_all(port: int, sid: str, cookie: str, viewers: int) -> list[dict[str, Any]]:
    """Open every connection's coroutine first, then let them all go at the same moment."""
    start = asyncio.Event()
    ws_url = f"ws://127.0.0.1:{port}/api/v1/streams/{sid}/ws?batch=1"
    sse_path = f"/api/v1/streams/{sid}/events?batch=1"
    tasks = [
        asyncio.create_task(
            redialling(
                start,
                partial(ws_viewer, ws_url, cookie)
                if i % 2
                else partial(sse_viewer, port, sse_path, cookie),
            )
        )
        for i in range(viewers)
    ]
    await asyncio.sleep(0.1)
    start.set()
    return list(await asyncio.gather(*tasks))


def main(argv: list[str]) -> None:
    port, sid, cookie, viewers = argv
    results = asyncio.run(attach_all(int(port), sid, cookie, int(viewers)))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
