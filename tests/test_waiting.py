"""Queue position on the owner's feed (workers/waiting.py), against the real stack: one
worker that runs one answer at a time, three answers posted at once."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import requests

from tests.client import assert_coherent, wait_for
from tests.conftest import Stack
from tests.test_aisdk import API, UIStream, default_body
from tests.test_feed import Event, feed_socket, finished, read_until
from web.aisdk import QUEUED_PART


@pytest.mark.stack_env(RELAY_QUEUE_POSITION_AFTER_S="0.5")
def test_waiting_answers_hear_their_place_in_line(isolated_stack: Stack) -> None:
    isolated_stack.start_worker("one-at-a-time", concurrency=1)
    client = isolated_stack.client()
    client.get_json("/api/v1/chats")  # the guest cookie, before the feed socket
    with feed_socket(client) as ws:
        assert json.loads(ws.recv(timeout=30))["type"] == "reset"
        first = client.post_chat("First [demo:words=120] [demo:rate=40]")  # about 3 s
        second = client.post_chat("Second [demo:words=80] [demo:rate=40]")
        third = client.post_chat("Third [demo:words=5]")
        got: list[Event] = []
        read_until(ws, finished(third["streamId"]), got)
    assert [e["seq"] for e in got] == list(range(got[0]["seq"], got[0]["seq"] + len(got)))

    def places(stream_id: str) -> list[int]:
        return [
            e["position"]
            for e in got
            if e["type"] == "answer.waiting" and e["streamId"] == stream_id
        ]

    def index(kind: str, stream_id: str) -> int:
        return next(
            i for i, e in enumerate(got) if e["type"] == kind and e["streamId"] == stream_id
        )

    # The second waits behind the first, the third behind both, then moves up one.
    assert places(second["streamId"]) == [1]
    assert places(third["streamId"]) == [2, 1]
    for posted in (second, third):
        sid = posted["streamId"]
        waited = [e for e in got if e["type"] == "answer.waiting" and e["streamId"] == sid]
        assert all(e["chatId"] == posted["chatId"] for e in waited)
        assert all(isinstance(e.get("etaSeconds", 0), int) for e in waited)
        assert index("answer.waiting", sid) < index("answer.started", sid)
    assert places(first["streamId"]) in ([], [1])  # started at once (or nearly)


@pytest.mark.stack_env(RELAY_QUEUE_POSITION_AFTER_S="0.5")
def test_viewers_of_a_queued_answer_hear_its_place_on_every_transport(
    isolated_stack: Stack,
) -> None:
    """The stream's own viewers (WebSocket, SSE, the AI SDK's stream) are told where a
    queued answer stands, as a notice with no seq; once it runs, its events are 1..n as
    always, and the notice is never part of a replay."""
    isolated_stack.start_worker("one-at-a-time", concurrency=1)
    client = isolated_stack.client()
    first = client.post_chat("First [demo:words=2000] [demo:rate=40]")  # runs until cancelled
    wait_for(lambda: client.stream(first["streamId"])["status"] == "running")
    second = client.post_chat("Second [demo:words=30]")
    sid = second["streamId"]

    # WebSocket: a notice, and nothing else while it waits.
    waiting = client.attach(sid, until=lambda a: bool(a.notices))
    assert waiting.events == []
    assert waiting.notices[0]["position"] == 1
    assert isinstance(waiting.notices[0].get("etaSeconds", 0), int)

    # SSE: an `event: queued` with no id (Last-Event-ID never moves for it).
    with client.http.get(client.url(second["events"]), stream=True, timeout=30) as resp:
        assert resp.status_code == 200
        block: list[str] = []
        for line in resp.iter_lines(decode_unicode=True):
            if line:
                block.append(line)
            elif "event: queued" in block:
                break
            else:
                block = []
    assert not any(line.startswith("id:") for line in block), block
    data = json.loads(next(line for line in block if line.startswith("data:"))[5:])
    assert data == waiting.notices[0] or data["type"] == "queued"

    # The AI SDK: a transient data part, which the SDK keeps out of the message.
    chat_id = uuid.uuid4().hex[:16]
    body = default_body(chat_id, "Third [demo:words=30]")
    with client.http.post(client.url(API), json=body, stream=True, timeout=60) as resp:
        ui = read_ui_until(resp, lambda part: part["type"] == QUEUED_PART)
    assert ui.parts[0]["type"] == "start"
    queued = ui.parts[-1]
    assert queued["transient"] is True and queued["data"]["position"] == 2  # behind Second

    cancelled = client.request("POST", f"/api/v1/streams/{first['streamId']}/cancel")
    assert cancelled.status_code == 202, cancelled.text
    done = client.attach(sid)  # maybe told its place once more, before it starts
    assert done.last["type"] == "done"
    assert_coherent(client, second["chatId"], done.events)  # seqs 1..n, the text stored
    replay = client.attach(sid)  # ended: a replay of the log, with no notice in it
    assert replay.events == done.events and replay.notices == []


def read_ui_until(resp: requests.Response, stop: Callable[[dict[str, Any]], bool]) -> UIStream:
    """A UI message stream's parts up to the first that ``stop`` accepts."""
    got = UIStream(resp.status_code, dict(resp.headers))
    assert resp.status_code == 200, resp.text
    for line in resp.iter_lines(decode_unicode=True):
        if line.startswith("data: ") and line != "data: [DONE]":
            got.parts.append(json.loads(line[len("data: ") :]))
            if stop(got.parts[-1]):
                return got
    raise AssertionError(f"the stream ended first: {got.parts}")
