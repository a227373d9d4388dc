"""POST /api/v1/streams/<id>/retry: a user continues their own failed or cancelled answer on
the same stream (the admin CLI's ``streams retry``), against the real stack."""

from __future__ import annotations

from typing import Any

import pytest

from tests.client import Client, assert_coherent, chunk_text, wait_for
from tests.conftest import Stack
from tests.procs import start_web


def retry(client: Client, stream_id: str, **headers: str) -> Any:
    return client.request("POST", f"/api/v1/streams/{stream_id}/retry", headers=headers)


def cancelled_midway(client: Client, message: str) -> dict[str, Any]:
    """Post, let a few chunks be written, cancel, and wait for the cancelled end."""
    posted = client.post_chat(message)
    sid = posted["streamId"]
    wait_for(lambda: client.stream(sid)["lastSeq"] >= 5, timeout=30)
    assert client.request("POST", f"/api/v1/streams/{sid}/cancel").status_code == 202
    client.wait_status(sid, {"cancelled"})
    return posted


def test_retry_of_a_cancelled_stream_continues_the_same_stream(client: Client) -> None:
    posted = cancelled_midway(client, "Retry me [demo:words=120]")
    sid, chat_id = posted["streamId"], posted["chatId"]
    before = client.attach(sid)  # the whole cancelled stream: chunks, then cancelled
    assert before.last["type"] == "cancelled"
    partial = client.answer(chat_id)
    assert partial["status"] == "cancelled" and partial["content"] == before.text

    resp = retry(client, sid)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert body == {
        "streamId": sid,
        "chatId": chat_id,
        "messageId": posted["messageId"],
        "status": "queued",
        "resumedSeq": before.last["seq"] + 1,
        "ws": f"/api/v1/streams/{sid}/ws",
        "events": f"/api/v1/streams/{sid}/events",
    }
    # A client that saw the cancelled event attaches after it: resumed, then the rest.
    rest = client.attach(sid, after=before.last["seq"], timeout=60)
    assert rest.events[0] == {"type": "resumed", "seq": body["resumedSeq"], "attempt": 2}
    assert rest.last["type"] == "done" and rest.close_code == 1000
    events = before.events + rest.events
    assert_coherent(client, chat_id, events)  # seq 1..n: no gap, no duplicate
    final = client.answer(chat_id)
    assert final["status"] == "complete"
    assert final["content"] == before.text + rest.text
    assert final["content"].startswith(partial["content"]) and chunk_text(rest.events)
    stream = client.stream(sid)
    assert stream["status"] == "done" and stream["attempt"] >= 2
    # Done now: a second retry is refused.
    again = retry(client, sid)
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "illegal_transition"


def test_retry_of_a_failed_stream(client: Client) -> None:
    posted = client.post_chat("Flaky [demo:words=40] [demo:fail-after=10]")
    sid = posted["streamId"]
    failed = client.wait_status(sid, {"failed"})
    assert failed["error"]["code"] == "generation_failed"
    seen = client.attach(sid)
    assert seen.last["type"] == "error"
    resp = retry(client, sid)
    assert resp.status_code == 202, resp.text
    # The demo fails again 10 chunks after each start: follow the stream to its end, however
    # many times it fails, and check the whole log is one gapless sequence.
    rest = client.attach(sid, after=seen.last["seq"], timeout=60)
    assert rest.events[0]["type"] == "resumed"
    assert rest.last["type"] in {"done", "error"}
    assert_coherent(client, posted["chatId"], seen.events + rest.events)
    assert client.stream(sid)["attempt"] >= 2


def test_retry_is_refused_for_running_and_for_other_users(stack: Stack) -> None:
    owner, stranger = stack.client(), stack.client()
    posted = owner.post_chat("Still going [demo:words=400] [demo:rate=20]")
    sid = posted["streamId"]
    owner.wait_status(sid, {"queued", "running"})
    resp = retry(owner, sid)
    assert resp.status_code == 409
    error = resp.json()["error"]
    assert error["code"] == "illegal_transition" and sid in error["message"]
    # Someone else's stream does not exist for them, running or not.
    resp = retry(stranger, sid)
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "stream_not_found"
    assert retry(owner, "no-such-stream").status_code == 404
    owner.request("POST", f"/api/v1/streams/{sid}/cancel")
    owner.wait_status(sid, {"cancelled"})
    resp = retry(stranger, sid)
    assert resp.status_code == 404
    assert resp.json()["error"] == {
        "code": "stream_not_found",
        "message": f"no stream {sid!r} for this user",
    }
    # A write from another site is refused before anything else.
    resp = retry(owner, sid, Origin="https://evil.example")
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == "forbidden_origin"
    assert owner.stream(sid)["status"] == "cancelled"


def test_retry_is_refused_while_another_answer_of_the_chat_runs(client: Client) -> None:
    first = cancelled_midway(client, "First [demo:words=200]")
    second = client.post_chat("Second [demo:words=400] [demo:rate=20]", first["chatId"])
    resp = retry(client, first["streamId"])
    assert resp.status_code == 409
    assert resp.json()["error"]["code"] == "chat_busy"
    client.request("POST", f"/api/v1/streams/{second['streamId']}/cancel")
    client.wait_status(second["streamId"], {"cancelled"})


@pytest.fixture
def limited(stack: Stack, tmp_path: Any) -> Any:
    """A web process of the same stack with one running answer per user allowed."""
    from ops.redis_server import free_port

    port = free_port()
    proc = start_web({**stack.env, "RELAY_MAX_RUNNING_PER_USER": "1"}, port, tmp_path)
    try:
        yield Client(f"http://127.0.0.1:{port}")
    finally:
        proc.stop()


def test_retry_counts_against_the_running_limit(limited: Client) -> None:
    stopped = cancelled_midway(limited, "Stopped [demo:words=200]")
    running = limited.post_chat("Another chat [demo:words=400] [demo:rate=20]")
    resp = retry(limited, stopped["streamId"])
    assert resp.status_code == 429
    assert resp.json()["error"]["code"] == "too_many_running"
    assert resp.headers["Retry-After"]
    limited.request("POST", f"/api/v1/streams/{running['streamId']}/cancel")
    limited.wait_status(running["streamId"], {"cancelled"})
    resp = retry(limited, stopped["streamId"])
    assert resp.status_code == 202, resp.text
    limited.wait_status(stopped["streamId"], {"done"}, timeout=60)
