"""A local server speaking the OpenAI chat-completions streaming protocol, for tests.

Behaviour is chosen by the requested model:
  fake-ok        streams ANSWER in small chunks, finish_reason "stop", then a usage chunk
  fake-length    like fake-ok but stops early with finish_reason "length"
  fake-slow      a long answer, one chunk every 20 ms (to cancel or crash in the middle); its
                 continuation (below) at the usual 2 ms
  fake-drop      streams 10 chunks, then drops the connection (no [DONE])
  fake-429       answers 429 to the first request of a conversation, then like fake-ok
  fake-500       always answers 500
  fake-401       always answers 401 with a body that quotes the API key
  fake-error     streams 10 chunks, then an error event that quotes the API key, then ends
  fake-nofinish  streams ANSWER and [DONE] but never a finish_reason
  fake-silent    streams 1 chunk, then sends nothing for 10 s, watching for a hang-up, then
                 closes the connection (its body chunked on a connection kept alive, as a
                 provider's: only relay's own read timeout can end that wait sooner)
  fake-pauses    like fake-keepalive in 80-character chunks 0.3 s apart (about 2 s in all)
  fake-crlf      like fake-ok in CRLF lines, with comments, event and retry fields, each JSON
                 split over two data lines, written a few bytes at a time
  fake-cr        the same with bare CR line ends
  fake-keepalive like fake-ok, in a chunked body on a connection kept open for the next request
  fake-badtext   BAD_PIECES: a NUL, a lone surrogate and an emoji whose surrogate pair is split
                 over two chunks (JSON escapes, as a model may send them)
A trailing assistant message is a prefix to continue: the answer resumes after it.
"""

from __future__ import annotations

import json
import select
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ANSWER = (
    "Resumable streams keep every chunk in a durable log. A client that drops can come back "
    "and ask for what it missed. Nothing is generated twice, and nothing is lost. "
) * 3


# What relay stores of them: U+FFFD for what UTF-8 and PostgreSQL cannot hold, the pair joined.
BAD_PIECES = ["Nul here:\x00!", " Lone:\ud800!", " Emoji split:\ud83d", "\ude00 end."]
BAD_STORED = "Nul here:\ufffd! Lone:\ufffd! Emoji split:\U0001f600 end."


PAUSES = {"fake-slow": 0.02, "fake-pauses": 0.3}  # between chunks (else 2 ms)


def answer_for(model: str) -> str:
    return ANSWER * 8 if model == "fake-slow" else ANSWER


@dataclass
class Exchange:
    """One request the fake server received, and what happened to its response."""

    body: dict[str, Any]
    headers: dict[str, str]
    peer: tuple[str, int]  # the client's address: the same for requests on one connection
    chunks_sent: int = 0
    disconnected: bool = False
    completed: bool = False
    raw: bytes = b""  # the request body as sent


@dataclass
class FakeOpenAI:
    exchanges: list[Exchange] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    server: ThreadingHTTPServer | None = None
    tls: ssl.SSLContext | None = None  # serve HTTPS with this context

    @property
    def base_url(self) -> str:
        assert self.server is not None
        if self.tls is not None:
            return f"https://127.0.0.1:{self.server.server_address[1]}/v1"
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def start(self) -> FakeOpenAI:
        fake = self

        class Handler(_Handler):
            owner = fake

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if self.tls is not None:  # each accept does the handshake (a failed one: no request)
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    owner: FakeOpenAI
    protocol_version = "HTTP/1.1"
    _model = ""  # the model of the request being answered

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        raw = self.rfile.read(length)
        body = json.loads(raw)
        exchange = Exchange(body, dict(self.headers.items()), self.client_address, raw=raw)
        self.owner.exchanges.append(exchange)
        model = self._model = body["model"]
        key = json.dumps(body["messages"][:2])
        if model == "fake-429" and key not in self.owner.seen:
            self.owner.seen.add(key)
            return self._error(429, "Rate limit reached for requests", "rate_limit_exceeded")
        if model == "fake-500":
            return self._error(500, "The server had an error", "server_error")
        if model == "fake-401":
            auth = self.headers.get("Authorization", "")
            return self._error(401, f"Incorrect API key provided: {auth[7:]}", "invalid_api_key")
        self._stream(exchange, model, body["messages"])

    @property
    def _newline(self) -> bytes | None:
        return {"fake-crlf": b"\r\n", "fake-cr": b"\r"}.get(self._model)

    @property
    def _chunked(self) -> bool:
        return self._model in ("fake-keepalive", "fake-silent", "fake-pauses")

    def _error(self, status: int, message: str, code: str) -> None:
        payload = json.dumps({"error": {"message": message, "type": code, "code": code}})
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload.encode())

    def _stream(self, exchange: Exchange, model: str, messages: list[dict[str, Any]]) -> None:
        text = answer_for(model)
        pause = PAUSES.get(model, 0.002)
        if messages and messages[-1]["role"] == "assistant":
            prefix = messages[-1]["content"]
            text = text[len(prefix) :] if text.startswith(prefix) else "[contradiction]"
            pause = min(pause, 0.002)  # what a continuation shows is its text, not its pace
        finish = "stop"
        if model == "fake-length":
            text, finish = text[:60], "length"
        size = 80 if model == "fake-pauses" else 7
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        if model == "fake-badtext":
            pieces = BAD_PIECES
        self._start_body()
        try:
            for n, piece in enumerate(pieces, start=1):
                if model == "fake-drop" and n > 10:
                    self.connection.shutdown(2)  # an abrupt end, no [DONE]
                    return
                if model == "fake-error" and n > 10:
                    return self._provider_error()
                if model == "fake-silent" and n > 1:
                    return self._wait_for_hangup(exchange, 10)
                self._event(_chunk(model, {"content": piece}, None))
                exchange.chunks_sent = n
                time.sleep(pause)
            if model != "fake-nofinish":
                self._event(_chunk(model, {}, finish))
            usage = {"prompt_tokens": 42, "completion_tokens": len(pieces), "total_tokens": 0}
            self._event({**_chunk(model, None, None), "choices": [], "usage": usage})
            self._write(b"data: [DONE]\n\n")
            self._end_body()
            exchange.completed = True
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            exchange.disconnected = True

    def _start_body(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Connection", "close")
        self.end_headers()

    def _end_body(self) -> None:
        if self._chunked:
            self.wfile.write(b"0\r\n\r\n")  # the end of the body; the connection stays
            self.wfile.flush()

    def _wait_for_hangup(self, exchange: Exchange, seconds: float) -> None:
        readable, _, _ = select.select([self.connection], [], [], seconds)
        if readable and not self.connection.recv(1):
            exchange.disconnected = True
        self.close_connection = True  # the body was not ended: nothing else can follow

    def _provider_error(self) -> None:
        auth = self.headers.get("Authorization", "")
        message = f"The server is overloaded (request by {auth[7:]})"
        self._event({"error": {"message": message, "type": "server_error", "code": None}})

    def _event(self, payload: dict[str, Any]) -> None:
        self._write(f"data: {json.dumps(payload)}\n\n".encode())

    def _write(self, event: bytes) -> None:
        if self._chunked:
            event = b"%x\r\n%s\r\n" % (len(event), event)
        newline = self._newline
        if newline is None:
            self.wfile.write(event)
            self.wfile.flush()
            return
        # Everything else a server may send: comments, fields, one event's data on two lines.
        head, sep, tail = event.partition(b", ")
        event = b": keep-alive\n\nevent: completion\nretry: 3000\n" + head + sep.strip() + (
            b"\ndata: " + tail if sep else b"")  # fmt: skip
        event = event.replace(b"\n", newline)
        for i in range(0, len(event), 5):  # splits lines, and CRLFs, across reads
            self.wfile.write(event[i : i + 5])
            self.wfile.flush()


def _chunk(model: str, delta: dict[str, Any] | None, finish: str | None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta or {}, "finish_reason": finish}
    return {
        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
        "model": model, "choices": [choice] if delta is not None else [],
    }  # fmt: skip
