"""The lean transport of the OpenAI-compatible provider: one ``httpx.Client`` per generator,
a small server-sent-events parser over the raw bytes, and ``loads`` (orjson) per chunk.

The official client builds a pydantic model per streamed chunk; reading the chunk's dict
directly costs a fraction of that (bench/openai_parse.py, docs/providers.md "Streaming
cost"). Errors are raised as the ``openai`` package's own exception types, so retries and
viewer-facing error codes are decided in one place for both transports.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Generator, Iterable, Iterator, Mapping
from typing import Any

import httpx
import openai
import orjson

from models.settings import Settings
from workers.generators.base import GenerationReport, GenerationRequest

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Connections are kept for the next answer (no new TCP and TLS handshake before its first
# token) when the end of the body is read after [DONE] (drain_for_reuse). hang_up() only
# touches a response that is still open, so never a connection back in the pool.
LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
DRAIN_S = 0.25  # how long the end of a body may take after [DONE] before we give up on reuse
Event = tuple[bytes, bytes]  # (event type, data)

# httpx logs every request at INFO ("HTTP Request: POST ... 200 OK"): in a worker that runs at
# INFO, one more line per answer, formatted and written on the path to its first chunk, where
# relay logs each answer's start and end itself. httpx's warnings still show; a deployment
# that configured the "httpx" logger keeps its own level.
if logging.getLogger("httpx").level == logging.NOTSET:
    logging.getLogger("httpx").setLevel(logging.WARNING)


class SSEParser:
    """Split a byte stream into server-sent events (the WHATWG event-stream rules)."""

    def __init__(self) -> None:
        self._rest = b""  # an unfinished line, carried to the next read
        self._event = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> list[Event]:
        """Return the events completed by this piece of the stream."""
        events: list[Event] = []
        for line in self._lines(chunk):
            if line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value[:1] == b" " else value)
            elif not line:
                if self._data:
                    events.append((self._event, b"\n".join(self._data)))
                self._event, self._data = b"", []
            elif line[:1] != b":":  # a line starting with a colon is a comment
                self._field(line)
        return events

    def end(self) -> list[Event]:
        """Return an event that a final lone CR completed (an unterminated one is dropped)."""
        return self.feed(b"\n") if self._rest.endswith(b"\r") else []

    def _lines(self, chunk: bytes) -> list[bytes]:
        buf = self._rest + chunk if self._rest else chunk
        tail = b""
        if b"\r" in buf:
            # A CR may be the first half of a CRLF split across two reads: decide it later.
            if buf.endswith(b"\r"):
                buf, tail = buf[:-1], b"\r"
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._rest = lines.pop() + tail
        return lines

    def _field(self, line: bytes) -> None:
        name, _, value = line.partition(b":")
        value = value[1:] if value[:1] == b" " else value
        if name == b"event":
            self._event = value
        elif name == b"data":  # "data" with no colon: an empty data line
            self._data.append(value)
        # id and retry only matter to a client that reconnects with GET; a POST never does.


class HttpxTransport:
    """Stream chat completions with httpx, reading each chunk as a plain dict."""

    def __init__(self, settings: Settings) -> None:
        self.url = completions_url(settings)
        self.client = httpx.Client(
            headers=request_headers(settings),
            timeout=settings.openai_timeout_s,
            limits=LIMITS,
            follow_redirects=True,  # as the official client does
        )

    def stream(
        self, request: GenerationRequest, params: dict[str, Any]
    ) -> Generator[str, None, None]:
        """Yield the answer's pieces from one upstream request."""
        sent = self.client.build_request("POST", self.url, json=request_body(params))
        response = self.client.send(sent, stream=True)
        request.abort.on_abort(lambda: hang_up(response))
        try:
            if not response.is_success:
                raise status_error(response)
            stream = events(response)
            finished = yield from texts(chunks(stream, response.request), request.report)
            if not finished and not request.abort.requested:
                # The connection closed before the model said it was done: a cut answer.
                raise httpx.RemoteProtocolError("the stream ended without a finish_reason")
            drain_for_reuse(stream)
        finally:
            response.close()  # also on .close() of this generator: stop paying for tokens


def completions_url(settings: Settings) -> str:
    """Where a lean transport posts: the server's ``/v1`` URL + ``/chat/completions``."""
    return (settings.openai_base_url or DEFAULT_BASE_URL).rstrip("/") + "/chat/completions"


def request_headers(settings: Settings) -> dict[str, str]:
    """What a lean transport sends besides the body's type, as the official client does."""
    return {
        # The SDK always sends a key; some servers reject a request without one.
        "Authorization": f"Bearer {settings.openai_api_key or 'unused'}",
        "Accept": "text/event-stream",
        **sdk_env_headers(os.environ),
    }


def hang_up(response: httpx.Response) -> None:
    """End a streamed response from any thread, at once: the upstream sees the connection
    close and a thread blocked reading it wakes (``close()`` alone leaves that thread
    waiting for the next byte or the read timeout, so a silent model kept it for minutes).
    """
    if response.is_closed:
        return
    network = response.extensions.get("network_stream")
    sock = network.get_extra_info("socket") if network is not None else None
    if not isinstance(sock, socket.socket):
        response.close()
        return
    with contextlib.suppress(OSError):  # already closed: nothing left to end
        sock.shutdown(socket.SHUT_RDWR)
    # The reading thread closes the response itself when it wakes (or when its generator
    # is closed): closing it here too would race with that read.


def drain_for_reuse(stream: Iterator[Event]) -> None:
    """Read the rest of the body after [DONE] (normally just its end, already on its way)
    so the connection goes back to the pool. Bounded, and only under gevent (where a wait
    can be cut short): a server that keeps the body open costs its connection, never the
    answer's end."""
    try:
        from gevent import Timeout, monkey
    except ImportError:
        return
    if not monkey.is_module_patched("socket"):
        return
    with contextlib.suppress(Exception), Timeout(DRAIN_S, False):
        for _ in stream:
            pass


def request_body(params: dict[str, Any]) -> dict[str, Any]:
    """The JSON body the SDK would send: ``extra_body`` keys merged at the top level."""
    body = {k: v for k, v in params.items() if k != "extra_body"}
    body.update(params.get("extra_body") or {})
    return body


def events(response: httpx.Response) -> Iterator[Event]:
    """Yield the server-sent events of a streamed response."""
    parser = SSEParser()
    for raw in response.iter_bytes():
        yield from parser.feed(raw)
    yield from parser.end()


def chunks(stream: Iterable[Event], request: httpx.Request) -> Iterator[dict[str, Any]]:
    """Yield each JSON chunk up to ``[DONE]``; raise the provider's error event (``request``
    goes into the SDK's error)."""
    for event, data in stream:
        if data.startswith(b"[DONE]"):
            return
        chunk = loads(data)
        if event == b"error" or (type(chunk) is dict and chunk.get("error")):
            raise stream_error(chunk, request)
        if type(chunk) is dict:  # anything else is no chat chunk: nothing to read in it
            yield chunk


def loads(data: bytes) -> Any:
    """An event's JSON: orjson's (a third of json's CPU, 2 against 7 µs for a chunk), or
    json's for what orjson refuses and json takes (NaN, a lone surrogate's escape), so what
    json accepts is read, the same, except that orjson makes an integer past 64 bits a float
    (relay reads only strings and token counts from a chunk)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data.decode())  # from str: skips json's encoding sniffing


def texts(stream: Iterable[dict[str, Any]], report: GenerationReport) -> Generator[str, None, bool]:
    """Yield the content pieces and fill in the report; return whether a choice finished."""
    finished = False
    for chunk in stream:
        usage = chunk.get("usage")
        if usage:
            report.prompt_tokens = usage.get("prompt_tokens")
            report.completion_tokens = usage.get("completion_tokens")
        for choice in chunk.get("choices") or ():
            if choice.get("finish_reason"):
                report.finish_reason = choice["finish_reason"]
                finished = True
            content = (choice.get("delta") or {}).get("content")
            if isinstance(content, str) and content:
                yield content
    return finished


def status_error(response: httpx.Response) -> openai.APIStatusError:
    """The SDK's error for a non-2xx answer, with the body parsed the way it parses it."""
    text = response.read().decode(errors="replace").strip()
    try:
        body: Any = json.loads(text)
        message = f"Error code: {response.status_code} - {body}"
    except ValueError:
        body, message = text, text or f"Error code: {response.status_code}"
    inner = body.get("error", body) if isinstance(body, dict) else body
    return openai.APIStatusError(message, response=response, body=inner)


def stream_error(payload: Any, request: httpx.Request) -> openai.APIError:
    """The SDK's error for an error event in the middle of a stream."""
    error = payload.get("error", payload) if isinstance(payload, dict) else payload
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str) or not message:
        message = "An error occurred during streaming"
    return openai.APIError(message, request, body=error)


def sdk_env_headers(environ: Mapping[str, str]) -> dict[str, str]:
    """The headers the official client adds from its own environment variables."""
    headers: dict[str, str] = {}
    if environ.get("OPENAI_ORG_ID"):
        headers["OpenAI-Organization"] = environ["OPENAI_ORG_ID"]
    if environ.get("OPENAI_PROJECT_ID"):
        headers["OpenAI-Project"] = environ["OPENAI_PROJECT_ID"]
    for line in environ.get("OPENAI_CUSTOM_HEADERS", "").split("\n"):
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip()] = value.strip()
    return headers
