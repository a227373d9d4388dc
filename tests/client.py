"""A test client for relay's API: HTTP with a cookie jar, WebSocket and SSE readers."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import requests
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect


@dataclass
class Attach:
    """What one WebSocket attach received."""

    events: list[dict[str, Any]] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""
    # Queue notices ({"type": "queued", ...}: no seq, not events of the log), in order.
    notices: list[dict[str, Any]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(e["text"] for e in self.events if e["type"] == "chunk")

    @property
    def seqs(self) -> list[int]:
        return [e["seq"] for e in self.events]

    @property
    def last(self) -> dict[str, Any]:
        return self.events[-1]


class Client:
    """One user (one cookie jar) talking to one web server."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = requests.Session()

    @property
    def ws_base(self) -> str:
        return "ws" + self.base_url[len("http") :]

    def url(self, path: str) -> str:
        return self.base_url + path

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("timeout", 15)
        return self.http.request(method, self.url(path), **kw)

    def post_chat(self, message: str, chat_id: str | None = None, **extra: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"message": message, **extra}
        if chat_id:
            body["chatId"] = chat_id
        resp = self.request("POST", "/api/v1/chat", json=body)
        assert resp.status_code == 202, resp.text
        data: dict[str, Any] = resp.json()
        return data

    def get_json(self, path: str) -> dict[str, Any]:
        resp = self.request("GET", path)
        assert resp.status_code == 200, resp.text
        data: dict[str, Any] = resp.json()
        return data

    def answer(self, chat_id: str) -> dict[str, Any]:
        """The chat's last assistant message."""
        messages = self.get_json(f"/api/v1/chats/{chat_id}")["messages"]
        return [m for m in messages if m["role"] == "assistant"][-1]  # type: ignore[no-any-return]

    def stream(self, stream_id: str) -> dict[str, Any]:
        return self.get_json(f"/api/v1/streams/{stream_id}")

    def wait_status(
        self, stream_id: str, statuses: set[str], timeout: float = 30
    ) -> dict[str, Any]:
        return wait_for(lambda: _if(self.stream(stream_id), statuses), timeout)

    # -- WebSocket ---------------------------------------------------------------------------

    def connect_ws(
        self, path: str, *, max_queue: int | None = 16, **headers: str
    ) -> ClientConnection:
        cookies = "; ".join(f"{k}={v}" for k, v in self.http.cookies.items())
        hdrs = {"Cookie": cookies} if cookies else {}
        if "Authorization" in self.http.headers:
            hdrs["Authorization"] = str(self.http.headers["Authorization"])
        hdrs.update(headers)
        return connect(
            self.ws_base + path, additional_headers=hdrs, open_timeout=10, max_queue=max_queue
        )

    def attach(
        self,
        stream_id: str,
        after: int = 0,
        *,
        until: Callable[[Attach], bool] | None = None,
        path: str | None = None,
        timeout: float = 30,
    ) -> Attach:
        """Read events until the server closes (or ``until`` says stop, then drop)."""
        got = Attach()
        target = path or f"/api/v1/streams/{stream_id}/ws?after={after}"
        # No read-side backpressure: when ``until`` stops early, messages the client did not
        # read (and the server's close frame behind them) would otherwise stay unread and the
        # client's closing handshake would wait for its 10 s timeout.
        with self.connect_ws(target, max_queue=None) as ws:
            deadline = time.monotonic() + timeout
            try:
                while time.monotonic() < deadline:
                    raw = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
                    message = json.loads(raw)
                    if message["type"] == "queued":
                        assert "seq" not in message, message
                        got.notices.append(message)
                    else:
                        got.events.append(message)
                    if until is not None and until(got):
                        return got
                raise AssertionError(f"attach timed out with {len(got.events)} events")
            except ConnectionClosed:
                pass
            got.close_code = ws.close_code
            got.close_reason = ws.close_reason or ""
        return got

    # -- SSE ----------------------------------------------------------------------------------

    def sse(
        self, path: str, *, last_event_id: int | None = None, limit: int | None = None
    ) -> tuple[int, list[dict[str, Any]]]:
        """Read an SSE response: (status, events); stops after ``limit`` events if given."""
        headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
        with self.http.get(self.url(path), headers=headers, stream=True, timeout=30) as resp:
            if resp.status_code != 200:
                return resp.status_code, []
            turn, events = _read_sse(resp, limit)
            assert turn is None, turn
            return 200, events

    def post_events(
        self,
        path: str,
        body: dict[str, Any] | None,
        *,
        last_event_id: int | None = None,
        limit: int | None = None,
        **headers: str,
    ) -> Streamed:
        """POST asking for the answer on the response (Accept: text/event-stream)."""
        headers = {"Accept": "text/event-stream", **headers}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        with self.http.post(
            self.url(path), json=body, headers=headers, stream=True, timeout=30
        ) as resp:
            if resp.status_code != 200:
                return Streamed(resp.status_code, resp.headers, None, [], resp.json())
            assert resp.headers["Content-Type"].startswith("text/event-stream"), resp.headers
            turn, events = _read_sse(resp, limit)
            return Streamed(200, resp.headers, turn, events, None)


@dataclass
class Streamed:
    """What a POST that asked for events got: the ``turn`` event, then the answer's."""

    status: int
    headers: Any
    turn: dict[str, Any] | None
    events: list[dict[str, Any]]
    error: dict[str, Any] | None  # the JSON body of a refusal

    @property
    def text(self) -> str:
        return "".join(e["text"] for e in self.events if e["type"] == "chunk")


def _read_sse(
    resp: requests.Response, limit: int | None
) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The ``turn`` event (first, if any) and the events of an SSE response."""
    turn: dict[str, Any] | None = None
    events: list[dict[str, Any]] = []
    for fields in sse_fields(resp.iter_lines(decode_unicode=True)):
        event = json.loads(fields["data"])
        if fields.get("event") == "turn":  # a streamed post's ids: no id, first, once
            assert "id" not in fields and turn is None and not events, fields
            assert event["type"] == "turn", fields
            turn = event
            continue
        if fields.get("event") == "queued":  # a notice: no id, not an event of the log
            assert "id" not in fields and event["type"] == "queued", fields
            continue
        assert int(fields["id"]) == last_seq(event) and fields["event"] == event["type"]
        events.append(event)
        if limit is not None and len(events) >= limit:
            break
    return turn, events


def sse_fields(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    fields: dict[str, str] = {}
    for line in lines:
        if not line:
            if "data" in fields:
                yield fields
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


def last_seq(message: dict[str, Any]) -> int:
    """The last seq a wire message carries (a ``chunks`` message carries several)."""
    if message["type"] == "chunks":
        return int(message["seq"]) + len(message["texts"]) - 1
    return int(message["seq"])


def expand(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events of batch-form messages, one per seq, as the default form sends them."""
    events: list[dict[str, Any]] = []
    for message in messages:
        if message["type"] != "chunks":
            events.append(message)
            continue
        assert len(message["texts"]) >= 2, message
        for i, text in enumerate(message["texts"]):
            events.append({"type": "chunk", "seq": message["seq"] + i, "text": text})
    return events


def _if(status: dict[str, Any], statuses: set[str]) -> dict[str, Any] | None:
    return status if status["status"] in statuses else None


def wait_for(probe: Callable[[], Any], timeout: float = 30, interval: float = 0.05) -> Any:
    """Poll ``probe`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s")


def wait_until(probe: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Poll ``probe`` (every 0.1 s) until it returns something truthy; TimeoutError naming
    ``what`` after ``timeout`` seconds (the servers the tests start: a node, a failover)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = probe()
        if result:
            return result
        time.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def chunk_text(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["type"] == "chunk")


def read_rest(client: Client, sid: str, seen: Attach) -> list[dict[str, object]]:
    """Keep re-attaching with after=<last seq> until the terminal event, as a client would."""
    events = list(seen.events)
    while not events or events[-1]["type"] not in {"done", "cancelled", "error"}:
        after = int(events[-1]["seq"]) if events else 0  # type: ignore[call-overload]
        events += client.attach(sid, after=after, timeout=60).events
    return events


def assert_coherent(client: Client, chat_id: str, events: list[dict[str, object]]) -> None:
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert chunk_text(events) == client.answer(chat_id)["content"]
