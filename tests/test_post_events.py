"""A post that asks for events (``Accept: text/event-stream``) gets its turn and then its
answer on the same response; a retry with its Idempotency-Key and Last-Event-ID resumes it
exactly; every refusal is still JSON and writes nothing. Real stack (gunicorn, Celery
worker, Redis), on SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import requests

from tests.client import Client, expand, sse_fields, wait_for
from tests.conftest import Stack

LONG = "[demo:words=400]"  # several seconds at the tests' pace: long enough to drop mid-answer
SHORT = "[demo:words=8]"
TURN_FIELDS = {"type", "chatId", "messageId", "userMessageId", "streamId", "ws", "events"}


def _chats(client: Client) -> list[dict[str, Any]]:
    chats: list[dict[str, Any]] = client.get_json("/api/v1/chats")["chats"]
    return chats


def _refused(got: Any, status: int, code: str) -> None:
    assert got.status == status, got
    assert got.error["error"]["code"] == code and got.error["error"]["message"], got.error


def test_the_answer_comes_on_the_posts_own_response(client: Client) -> None:
    got = client.post_events("/api/v1/chat", {"message": f"One request {SHORT}"})
    assert got.status == 200 and got.turn is not None
    assert set(got.turn) == TURN_FIELDS and got.turn["type"] == "turn"
    sid = got.turn["streamId"]
    assert got.turn["ws"] == f"/api/v1/streams/{sid}/ws"
    assert got.turn["events"] == f"/api/v1/streams/{sid}/events"
    assert "Idempotent-Replayed" not in got.headers
    assert [e["seq"] for e in got.events] == list(range(1, len(got.events) + 1))
    assert got.events[-1]["type"] == "done" and got.text
    cid = got.turn["chatId"]
    answer = client.answer(cid)
    assert (answer["id"], answer["content"]) == (got.turn["messageId"], got.text)
    assert got.events == client.attach(sid).events  # the same events a viewer gets
    # The chat goes on in the same form.
    more = client.post_events("/api/v1/chat", {"message": f"And {SHORT}", "chatId": cid})
    assert more.status == 200 and more.turn is not None
    assert more.turn["chatId"] == got.turn["chatId"] and more.events[-1]["type"] == "done"


def test_the_batch_form_on_a_post(client: Client) -> None:
    got = client.post_events("/api/v1/chat?batch=1", {"message": f"Batched {LONG}"})
    assert got.status == 200 and got.turn is not None
    assert expand(got.events) == client.attach(got.turn["streamId"]).events


def test_a_retry_with_its_key_resumes_after_the_last_event_it_read(client: Client) -> None:
    body = {"message": f"Resume me {LONG}"}
    first = client.post_events("/api/v1/chat", body, limit=7, **{"Idempotency-Key": "p-1"})
    assert first.status == 200 and first.turn is not None and len(first.events) == 7
    # The connection dropped after seq 7; the retry (as fetch-event-source sends it) resumes.
    rest = client.post_events("/api/v1/chat", body, last_event_id=7, **{"Idempotency-Key": "p-1"})
    assert rest.status == 200 and rest.headers["Idempotent-Replayed"] == "true"
    assert rest.turn == first.turn
    events = first.events + rest.events
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["type"] == "done"
    assert events == client.attach(first.turn["streamId"]).events
    assert len(_chats(client)) == 1  # nothing new was started
    # A retry from the start replays it whole; one after its end gets the turn alone.
    whole = client.post_events("/api/v1/chat", body, **{"Idempotency-Key": "p-1"})
    assert whole.events == events
    end = client.post_events(
        "/api/v1/chat", body, last_event_id=len(events), **{"Idempotency-Key": "p-1"}
    )
    assert end.status == 200 and end.turn == first.turn and end.events == []
    # The JSON form of the same retry gets the same turn.
    resp = client.request("POST", "/api/v1/chat", json=body, headers={"Idempotency-Key": "p-1"})
    assert resp.status_code == 202
    assert {"type": "turn", **resp.json()} == first.turn
    assert len(_chats(client)) == 1


def test_refusals_are_json_and_write_nothing(client: Client) -> None:
    body = {"message": f"Refused {SHORT}"}
    # Resuming needs the first post's key: without one, nothing is started.
    _refused(client.post_events("/api/v1/chat", body, last_event_id=3), 400, "invalid_after")
    # A key never answered has nothing to resume; the key stays free for a real first post.
    key = {"Idempotency-Key": "p-2"}
    _refused(client.post_events("/api/v1/chat", body, last_event_id=3, **key), 400, "invalid_after")
    bad = client.post_events("/api/v1/chat", body, last_event_id=-1)
    _refused(bad, 400, "invalid_after")
    _refused(client.post_events("/api/v1/chat?batch=2", body), 400, "invalid_parameter")
    _refused(client.post_events("/api/v1/chat", {"message": " "}), 400, "invalid_message")
    assert _chats(client) == []
    got = client.post_events("/api/v1/chat", body, **key)
    assert got.status == 200 and got.turn is not None and got.events[-1]["type"] == "done"
    # A busy chat is refused as a JSON post is, and its running answer is left alone.
    running = client.post_events("/api/v1/chat", {"message": f"Busy {LONG}"}, limit=1)
    assert running.turn is not None
    cid = running.turn["chatId"]
    busy = client.post_events("/api/v1/chat", {"message": "next", "chatId": cid})
    _refused(busy, 409, "chat_busy")
    rest = client.attach(running.turn["streamId"])
    assert rest.last["type"] == "done" and rest.events[0] == running.events[0]


def test_json_stays_the_default(client: Client) -> None:
    for accept in ("*/*", "application/json", "application/json, text/event-stream", None):
        headers = {"Accept": accept} if accept else {}
        resp = client.request(
            "POST", "/api/v1/chat", json={"message": f"JSON {SHORT}"}, headers=headers
        )
        assert resp.status_code == 202, (accept, resp.text)
        assert resp.headers["Content-Type"] == "application/json", accept
        client.attach(resp.json()["streamId"])
    # Preferring events to JSON is asking for them.
    resp = client.request(
        "POST",
        "/api/v1/chat",
        json={"message": f"Events {SHORT}"},
        headers={"Accept": "text/event-stream, application/json;q=0.5"},
    )
    assert resp.status_code == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    assert "event: turn" in resp.text and "event: done" in resp.text


def test_a_regenerated_answer_on_the_posts_response(client: Client, stack: Stack) -> None:
    posted = client.post_chat(f"Regenerate me {SHORT}")
    old = client.attach(posted["streamId"])
    assert old.last["type"] == "done"
    got = client.post_events(f"/api/v1/chats/{posted['chatId']}/regenerate", None)
    assert got.status == 200 and got.turn is not None
    assert got.turn["chatId"] == posted["chatId"] and got.turn["streamId"] != posted["streamId"]
    assert got.events[-1]["type"] == "done"
    assert client.answer(posted["chatId"])["content"] == got.text
    assert client.request("GET", f"/api/v1/streams/{posted['streamId']}").status_code == 404


def test_a_web_crash_mid_answer_then_a_retry_of_the_post(stack: Stack) -> None:
    """The web process serving a streamed post is SIGKILLed mid-answer; the client retries
    the same post (its key, Last-Event-ID) on the restarted process and misses nothing."""
    web, port = stack.start_web()
    client = stack.client(f"http://127.0.0.1:{port}")
    body = {"message": f"Survive a web crash {LONG}"}
    key = {"Idempotency-Key": "crash-1"}
    headers = {"Accept": "text/event-stream", **key}
    seen: list[dict[str, Any]] = []
    turn: dict[str, Any] | None = None
    resp = client.http.post(client.url("/api/v1/chat"), json=body, headers=headers, stream=True,
                            timeout=30)  # fmt: skip
    try:
        assert resp.status_code == 200
        for fields in sse_fields(resp.iter_lines(decode_unicode=True)):
            event = json.loads(fields["data"])
            if fields.get("event") == "turn":
                turn = event
            elif fields.get("event") != "queued":
                seen.append(event)
            if len(seen) >= 10:
                break
        web.kill()  # SIGKILL, mid-answer, while the response is open
        tail: list[str] = []  # what was in flight; then the read fails or just ends
        with contextlib.suppress(requests.exceptions.RequestException):
            tail.extend(resp.iter_lines(decode_unicode=True))
        assert "event: done" not in tail
    finally:
        resp.close()
        web.kill()
    assert turn is not None
    sid = turn["streamId"]
    # Generation never paused: the answer goes on while no web process is up.
    log = f"relay:{{{sid}}}:log"
    wait_for(lambda: int(stack.redis().xlen(log)) > seen[-1]["seq"] + 5, timeout=10)
    restarted, _ = stack.start_web(port=port)
    try:
        rest = client.post_events("/api/v1/chat", body, last_event_id=seen[-1]["seq"], **key)
        assert rest.status == 200 and rest.turn == turn
        assert rest.headers["Idempotent-Replayed"] == "true"
        events = seen + rest.events
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert events[-1]["type"] == "done"
        text = "".join(e["text"] for e in events if e["type"] == "chunk")
        assert rest.text and text == client.answer(turn["chatId"])["content"]
        assert len(_chats(client)) == 1  # the retry started nothing
    finally:
        restarted.stop()
