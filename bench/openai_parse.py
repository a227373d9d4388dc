"""Worker CPU per streamed chunk of the OpenAI-compatible provider, for each transport.

A server in another process streams chat.completion.chunk events shaped like OpenAI's
(~20-character contents, chunked transfer encoding, one write per event) over loopback;
this process consumes them and measures only its own CPU time (time.process_time) around
the consuming loop. Two pacings: ``burst`` (events back to back: the consumer never waits)
and ``paced`` (a pause between events, so the consumer waits for each one, as when a model
streams tokens: a wake-up per event, on cold caches, costs more). Besides the three
transports of the real generator (``sdk``, ``httpx``, ``urllib3``), the SSE parsers are
compared on the same httpx stream, with ``read-only`` (no parsing) as the floor, and alone
from memory. Prints one JSON object.

    .venv/bin/python -m bench.openai_parse [--chunks 20000] [--repeat 3] [--pace-us 300]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import httpx_sse
import orjson

from models.settings import Settings
from workers.generators import GenerationRequest, Turn
from workers.generators.openai_chat import OpenAIChatGenerator
from workers.generators.openai_stream import SSEParser

ROOT = Path(__file__).resolve().parent.parent
TEXT = (
    "the durable log keeps every chunk so a viewer that drops can come back and read what "
    "it missed while the worker goes on appending tokens from the model as they arrive"
)
WORDS = TEXT.split()


# -- the upstream (its own process) -----------------------------------------------------------


def contents(n: int) -> list[str]:
    """Token-run pieces of ~20 characters."""
    out, i = [], 0
    for _ in range(n):
        piece = ""
        while len(piece) < 18:
            piece += " " + WORDS[i % len(WORDS)]
            i += 1
        out.append(piece)
    return out


def render(n: int, model: str) -> list[bytes]:
    """The SSE events of one answer, as OpenAI sends them (include_usage on)."""
    head = {
        "id": "chatcmpl-C0ffee0123456789abcdefABCDEF", "object": "chat.completion.chunk",
        "created": 1760000000, "model": model, "service_tier": "default",
        "system_fingerprint": "fp_51db84afab",
    }  # fmt: skip

    def event(delta: dict[str, Any] | None, finish: str | None, usage: Any = None) -> bytes:
        choices = [] if delta is None else [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]  # fmt: skip
        chunk = {**head, "choices": choices, "usage": usage, "obfuscation": "Xk3d9s"}
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    usage = {"prompt_tokens": 42, "completion_tokens": n, "total_tokens": n + 42}
    return [
        event({"role": "assistant", "content": "", "refusal": None}, None),
        *(event({"content": text}, None) for text in contents(n)),
        event({}, "stop"),
        event(None, None, usage),
        b"data: [DONE]\n\n",
    ]


class Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _, n, pace_us = body["model"].split("-")  # "bench-<chunks>-<pause µs>"
        events = render(int(n), body["model"])
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        pause = int(pace_us) / 1e6
        for data in events:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))  # one send per event
            if pause:
                time.sleep(pause)
        self.wfile.write(b"0\r\n\r\n")


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client dropping a kept-alive connection at exit is no news


def serve() -> None:
    server = QuietServer(("127.0.0.1", 0), Upstream)
    print(server.server_address[1], flush=True)
    server.serve_forever()


# -- consumers (this process, measured) -------------------------------------------------------


def via_generator(transport: str) -> Callable[[str, str], int]:
    """Consume through the real generator with the given transport."""
    cache: dict[str, OpenAIChatGenerator] = {}

    def consume(base_url: str, model: str) -> int:
        if base_url not in cache:
            settings = replace(Settings(), generator="openai", openai_base_url=base_url,
                               openai_transport=transport, openai_retries=0)  # fmt: skip
            cache[base_url] = OpenAIChatGenerator(settings)
        request = GenerationRequest("bench", (Turn("user", "stream please"),), model=model)
        return sum(1 for _ in cache[base_url].generate(request))

    return consume


def via_client(
    parse: Callable[[httpx.Response], Iterator[Any]], loads: Callable[[Any], Any] = json.loads
) -> Callable[[str, str], int]:
    """Consume with a bare httpx client and the given parser, reading each delta's content."""
    client = httpx.Client(timeout=60)

    def consume(base_url: str, model: str) -> int:
        count = 0
        body = {"model": model, "messages": [], "stream": True}
        with client.stream("POST", base_url + "/chat/completions", json=body) as response:
            for data in parse(response):
                if data[:6] in ("[DONE]", b"[DONE]"):
                    break
                for choice in loads(data)["choices"]:
                    count += bool(choice["delta"].get("content"))
        return count

    return consume


def read_only(response: httpx.Response) -> Iterator[bytes]:
    """No parsing at all: the floor, httpx reading the stream."""
    for _ in response.iter_bytes():
        pass
    yield from ()


def with_httpx_sse(response: httpx.Response) -> Iterator[str]:
    for sse in httpx_sse.EventSource(response).iter_sse():
        yield sse.data


def with_parser(response: httpx.Response) -> Iterator[str]:
    parser = SSEParser()
    for raw in response.iter_bytes():
        for _, data in parser.feed(raw):
            yield data.decode()  # as the transport does, and as httpx-sse hands out str


def with_iter_lines(response: httpx.Response) -> Iterator[str]:
    """The naive parser: httpx's lines (which also split on U+2028 etc.), data: only."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line[6:]


VARIANTS: dict[str, Callable[[], Callable[[str, str], int]]] = {
    "sdk": lambda: via_generator("sdk"),
    "httpx": lambda: via_generator("httpx"),
    "urllib3": lambda: via_generator("urllib3"),
    "read-only": lambda: via_client(read_only),
    "parse:httpx-sse": lambda: via_client(with_httpx_sse),
    "parse:relay-sse": lambda: via_client(with_parser),
}
VARIANTS["parse:relay-sse+orjson"] = lambda: via_client(with_parser, orjson.loads)


def measure(consume: Callable[[str, str], int], base_url: str, n: int, pace_us: int) -> float:
    """CPU µs of this process per chunk, consuming one stream of ``n`` chunks."""
    consume(base_url, f"bench-200-{pace_us}")  # warm up: lazy imports, the connection
    started = time.process_time()
    got = consume(base_url, f"bench-{n}-{pace_us}")
    cpu = time.process_time() - started
    if got not in (0, n):  # read-only counts nothing
        raise RuntimeError(f"expected {n} pieces, got {got}")
    return cpu / n * 1e6


def parse_costs(n: int) -> dict[str, float]:
    """µs per chunk of the SSE parsers alone: one event per read, from memory, no socket."""
    events = render(n, "gpt-4o-mini")
    parsers: dict[str, Callable[[httpx.Response], Iterator[Any]]] = {
        "read-only": read_only, "httpx-sse": with_httpx_sse, "relay-sse": with_parser,
        "iter_lines": with_iter_lines,
    }  # fmt: skip
    out = {}
    for name, parse in parsers.items():
        best = float("inf")
        for _ in range(5):
            response = httpx.Response(
                200, headers={"Content-Type": "text/event-stream"}, content=iter(events)
            )
            started = time.process_time()
            for _ in parse(response):
                pass
            best = min(best, time.process_time() - started)
        out[name] = round(best / len(events) * 1e6, 2)
    return out


def json_costs(n: int) -> dict[str, float | None]:
    """µs per chunk of decoding the payloads alone, without any I/O."""
    payloads = [e[6:-2] for e in render(n, "gpt-4o-mini")[1:-1]]
    out: dict[str, float | None] = {}
    decoders: dict[str, Any] = {
        "json": lambda data: json.loads(data.decode()),
        "orjson": orjson.loads,
    }
    for name, loads in decoders.items():
        started = time.process_time()
        for data in payloads:
            loads(data)
        out[name] = round((time.process_time() - started) / len(payloads) * 1e6, 2)
    return out


def run(n: int, repeat: int, pace_us: int) -> dict[str, Any]:
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.openai_parse", "--serve"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        base_url = f"http://127.0.0.1:{int(server.stdout.readline())}/v1"
        consumers = {name: make() for name, make in VARIANTS.items()}
        results: dict[str, Any] = {}
        for mode, pause in (("burst", 0), ("paced", pace_us)):
            runs: dict[str, list[float]] = {name: [] for name in consumers}
            for _ in range(repeat):  # interleaved, so drift on a shared machine hits all alike
                for name, consume in consumers.items():
                    runs[name].append(measure(consume, base_url, n, pause))
            results[mode] = {
                name: {"us_per_chunk": round(statistics.median(r), 2),
                       "runs": [round(x, 2) for x in r]}
                for name, r in runs.items()
            }  # fmt: skip
    finally:
        server.kill()
        server.wait()
    event_bytes = statistics.mean(len(e) for e in render(200, "gpt-4o-mini-2024-07-18"))
    return {
        "config": {
            "chunks": n, "repeat": repeat, "paced_pause_us": pace_us,
            "mean_content_chars": round(statistics.mean(len(c) for c in contents(n)), 1),
            "mean_event_bytes": round(event_bytes, 1),
            "python": platform.python_version(),
            **{pkg: metadata.version(pkg)
               for pkg in ("openai", "httpx", "httpx-sse", "pydantic", "urllib3")},
            "cpus": os.cpu_count(),
        },
        "cpu_us_per_chunk": results,
        "parse_only_us_per_chunk": parse_costs(n),
        "json_decode_us_per_chunk": json_costs(n),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--pace-us", type=int, default=300, help="pause between paced events")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return 0
    json.dump(run(args.chunks, args.repeat, args.pace_us), sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
