"""Queue position on the owner's feed (workers/waiting.py), against the real stack: one
worker that runs one answer at a time, three answers posted at once."""

from __future__ import annotations

import json

import pytest

from tests.conftest import Stack
from tests.test_feed import Event, feed_socket, finished, read_until


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
