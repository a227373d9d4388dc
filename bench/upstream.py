"""Fake OpenAI-compatible chat-completions server for the benchmarks (``python -m bench.upstream``).

Raw HTTP/1.1 on asyncio (keep-alive, chunked responses) so that it costs far less per chunk
than relay does. It prints ``PORT <n>`` on stdout once it listens. The orchestrator steers it
through ``/control/*``: ``go`` starts gated streams, ``release`` ends held ones, ``count`` and
``stats`` report what was written and when, ``clock`` reads the clock. bench/node/upstream.mjs
is the same in Node (the default, BENCH_UPSTREAM=node): keep the two in step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from bench.stats import now_us, summarize
from bench.upstream_stream import (
    Emitter,
    Record,
    closing_events,
    http_chunk,
    parse_plan,
    role_event,
)

# A held response sends an SSE comment this often, as real servers do while a model thinks:
# relay's provider gives up on an upstream that is silent for RELAY_OPENAI_TIMEOUT_S (60 s).
KEEPALIVE_S = 10.0
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


class Upstream:
    """The server's state: stream records, the go and release signals, pacing lag."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.go = asyncio.Event()
        self.go_us = 0
        self.release = asyncio.Event()
        self.records: dict[int, Record] = {}
        self.lag: list[int] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve requests on one connection until the client closes it."""
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                arrived = now_us()
                method, path, headers = _parse_head(head)
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                await self.route(method, path, body, arrived, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def route(
        self, method: str, path: str, body: bytes, arrived: int, w: asyncio.StreamWriter
    ) -> None:
        """Dispatch one request: a chat completion or a control call."""
        if method == "POST" and path.endswith("/chat/completions"):
            await self.complete(json.loads(body), arrived, w)
        elif method == "POST" and path == "/control/go":
            if not self.go.is_set():
                self.go_us = now_us()
                self.go.set()
            _reply(w, 200, {"go_us": self.go_us})
        elif method == "POST" and path == "/control/release":
            self.release.set()
            _reply(w, 200, {"released_us": now_us()})
        elif path == "/control/count":
            _reply(w, 200, self.count())
        elif path == "/control/stats":
            _reply(w, 200, self.stats())
        elif path == "/control/clock":
            _reply(w, 200, {"clock_us": now_us(), "pid": os.getpid()})
        else:
            _reply(w, 404, {"error": {"message": f"no route {method} {path}"}})
        await w.drain()

    async def complete(self, body: dict[str, Any], arrived: int, w: asyncio.StreamWriter) -> None:
        """Stream one chat completion following the plan in the user message."""
        plan = parse_plan(body.get("messages", []))
        if plan is None:
            _reply(w, 400, {"error": {"message": "no bench plan in the user message"}})
            return
        rec = self.records[plan.s] = Record(plan, arrived)
        w.write(STREAM_HEAD + http_chunk(role_event()))
        await w.drain()
        try:
            await self._deltas(rec, w)
            if plan.hold:
                await self._hold(w)
            w.write(http_chunk(closing_events(rec.produced)) + b"0\r\n\r\n")
            await w.drain()
            rec.done_us = now_us()
        except ConnectionError:
            rec.disconnected = True
            raise

    async def _hold(self, w: asyncio.StreamWriter) -> None:
        """Keep the response open, with keepalive comments, until released."""
        while not self.release.is_set():
            try:
                await asyncio.wait_for(self.release.wait(), KEEPALIVE_S)
            except TimeoutError:
                w.write(http_chunk(b": keepalive\n\n"))
                await w.drain()

    async def _deltas(self, rec: Record, w: asyncio.StreamWriter) -> None:
        emitter = Emitter(w, rec, self.width, self.lag)
        base = rec.arrived_us
        if rec.plan.gate:
            await self.go.wait()
            base = self.go_us
        if rec.plan.rate > 0:
            await emitter.paced(base)
        else:
            await emitter.unpaced()

    def count(self) -> dict[str, int]:
        """Return how many streams arrived, were fully written and finished."""
        recs = list(self.records.values())
        return {
            "arrived": len(recs),
            "written": sum(1 for r in recs if r.produced == r.plan.n),
            "done": sum(1 for r in recs if r.done_us),
            "produced": sum(r.produced for r in recs),
        }

    def stats(self) -> dict[str, Any]:
        """Return the counts, the pacing lag and every stream's record."""
        lag_ms = [x / 1000 for x in self.lag]
        return {
            "go_us": self.go_us,
            **self.count(),
            "pacing_lag_ms": summarize(lag_ms) if lag_ms else None,
            "streams": {str(s): r.as_json() for s, r in self.records.items()},
        }


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for raw in lines[1:]:
        if ":" in raw:
            k, v = raw.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return method, target.split("?", 1)[0], headers


def _reply(w: asyncio.StreamWriter, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
    w.write(
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


async def serve(width: int) -> None:
    """Listen on a free loopback port, announce it, and serve until killed."""
    up = Upstream(width)
    server = await asyncio.start_server(up.handle, "127.0.0.1", 0, backlog=4096)
    port = server.sockets[0].getsockname()[1]
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()
    async with server:
        await server.serve_forever()


def main() -> None:
    """Parse the options and serve."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunk-chars", type=int, default=int(os.environ.get("CHUNK_CHARS", 20)))
    asyncio.run(serve(parser.parse_args().chunk_chars))


if __name__ == "__main__":
    main()
