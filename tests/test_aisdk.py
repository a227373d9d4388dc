"""The AI SDK endpoints (web/aisdk.py) against a real stack: relay's events as the SDK's UI
message stream for answers that end done, cancelled, failed, retried and replayed from SQL,
and chat ids scoped per user. The real SDK drives them in tests/test_aisdk_sdk.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import requests

from models.keys import log_key, state_key
from tests.client import Client, wait_for
from tests.conftest import Stack
from tests.procs import BIN, ROOT

API = "/api/v1/ai-sdk/chat"
LONG = "[demo:words=400]"  # several seconds: long enough to act on it mid-answer
MEDIUM = "[demo:words=150]"


@dataclass
class UIStream:
    """What one UI message stream response carried."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    parts: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False  # ended with data: [DONE]
    lines: Iterator[str] = field(default_factory=lambda: iter(()))

    @property
    def types(self) -> list[str]:
        return [p["type"] for p in self.parts]

    @property
    def text(self) -> str:
        return "".join(p["delta"] for p in self.parts if p["type"] == "text-delta")

    @property
    def shape(self) -> list[str]:
        """The types with each run of text-deltas folded into one (catch-up may coalesce)."""
        out: list[str] = []
        for kind in self.types:
            if not (kind == "text-delta" and out and out[-1] == kind):
                out.append(kind)
        return out

    def deltas(self) -> int:
        return self.types.count("text-delta")


def new_id() -> str:
    return uuid.uuid4().hex[:16]


def user_message(text: str) -> dict[str, Any]:
    return {"id": new_id(), "role": "user", "parts": [{"type": "text", "text": text}]}


def default_body(
    chat_id: str, text: str, history: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The body an unmodified DefaultChatTransport posts."""
    messages = [*(history or []), user_message(text)]
    return {"id": chat_id, "messages": messages, "trigger": "submit-message"}


def read_ui(resp: requests.Response, stop_after_deltas: int | None = None) -> UIStream:
    """Read a UI message stream; with ``stop_after_deltas``, return once that many arrived
    (the response stays open for the caller to read on with ``read_more``)."""
    got = UIStream(resp.status_code, dict(resp.headers))
    if resp.status_code != 200:
        return got
    got.lines = resp.iter_lines(decode_unicode=True)  # one iterator: it buffers
    return read_more(got, stop_after_deltas)


def read_more(got: UIStream, stop_after: int | None = None) -> UIStream:
    for line in got.lines:
        if not line.startswith("data: "):
            assert not line or line.startswith(":"), line  # only data lines and comments
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            got.done = True
            continue
        assert not got.done, "a part after [DONE]"
        got.parts.append(json.loads(data))
        if stop_after is not None and got.deltas() >= stop_after:
            return got
    return got


def send(
    client: Client, body: dict[str, Any], stop_after_deltas: int | None = None
) -> tuple[UIStream, requests.Response]:
    resp = client.http.post(client.url(API), json=body, stream=True, timeout=60)
    return read_ui(resp, stop_after_deltas), resp


def resume(client: Client, chat_id: str) -> UIStream:
    with client.http.get(client.url(f"{API}/{chat_id}/stream"), stream=True, timeout=60) as resp:
        return read_ui(resp)


def hydrate(client: Client, chat_id: str) -> list[dict[str, Any]]:
    resp = client.request("GET", f"{API}/{chat_id}/messages")
    assert resp.status_code == 200, resp.text
    messages: list[dict[str, Any]] = resp.json()
    return messages


def stop(client: Client, chat_id: str, **body: Any) -> dict[str, Any]:
    resp = client.request("POST", f"{API}/{chat_id}/stop", json=body)
    assert resp.status_code == 200, resp.text
    answer: dict[str, Any] = resp.json()
    return answer


def relay_answer(client: Client, message_id: str) -> dict[str, Any]:
    """relay's own view of the answer (chat detail of the API under /api/v1)."""
    for chat in client.get_json("/api/v1/chats")["chats"]:
        for message in client.get_json(f"/api/v1/chats/{chat['id']}")["messages"]:
            if message["id"] == message_id:
                return message  # type: ignore[no-any-return]
    raise AssertionError(f"no message {message_id}")


def assert_finished(got: UIStream, message_id: str, content: str) -> None:
    assert got.status == 200 and got.done
    assert got.parts[0] == {"type": "start", "messageId": message_id}
    assert got.shape == ["start", "text-start", "text-delta", "text-end", "finish"]
    assert got.parts[-1] == {"type": "finish", "finishReason": "stop"}
    assert got.text == content


def test_send_answers_with_the_stream_and_resume_replays_it(client: Client) -> None:
    chat_id = new_id()
    got, resp = send(client, default_body(chat_id, "Hello there [demo:words=25]"))
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert resp.headers["cache-control"] == "no-cache" and resp.headers["x-accel-buffering"] == "no"
    message_id = got.parts[0]["messageId"]
    answer = relay_answer(client, message_id)
    assert answer["status"] == "complete"
    assert_finished(got, message_id, answer["content"])
    assert got.deltas() > 5  # live: one delta per chunk or so, not one block at the end
    # A reconnect within RELAY_RESUME_FALLBACK_S replays the whole answer, same id.
    assert_finished(resume(client, chat_id), message_id, answer["content"])
    # The body of the SDK's resume docs ({id, message}) continues the same chat.
    second, _ = send(client, {"id": chat_id, "message": user_message("More [demo:words=10]")})
    second_id = second.parts[0]["messageId"]
    assert_finished(second, second_id, relay_answer(client, second_id)["content"])
    hydrated = hydrate(client, chat_id)
    assert [m["role"] for m in hydrated] == ["user", "assistant", "user", "assistant"]
    assert hydrated[1] == {
        "id": message_id, "role": "assistant",
        "parts": [{"type": "text", "text": answer["content"], "state": "done"}],
    }  # fmt: skip
    assert hydrated[2]["parts"][0]["text"] == "More [demo:words=10]"


def test_stop_cancels_and_every_response_ends_with_abort(client: Client) -> None:
    chat_id = new_id()
    got, resp = send(client, default_body(chat_id, f"Stop me {LONG}"), stop_after_deltas=3)
    message_id = got.parts[0]["messageId"]
    stopped = stop(client, chat_id, messageId=message_id)
    assert stopped == {"status": "cancelled", "messageId": message_id}
    read_more(got)
    resp.close()
    content = relay_answer(client, message_id)["content"]
    assert relay_answer(client, message_id)["status"] == "cancelled"
    for seen in (got, resume(client, chat_id)):
        assert seen.done and seen.parts[0] == {"type": "start", "messageId": message_id}
        assert seen.shape == ["start", "text-start", "text-delta", "text-end", "abort"]
        assert seen.parts[-1] == {"type": "abort", "reason": "cancelled"}
        assert seen.text == content
    # Idempotent, and the chat takes the next turn at once (not 409 chat_busy).
    assert stop(client, chat_id) == {"status": "none", "messageId": None}
    nxt, _ = send(client, default_body(chat_id, "Next [demo:words=5]"))
    assert nxt.status == 200 and nxt.types[-1] == "finish"


def test_a_stop_for_another_answer_does_nothing(client: Client) -> None:
    chat_id = new_id()
    got, resp = send(client, default_body(chat_id, f"Keep going {LONG}"), stop_after_deltas=1)
    assert stop(client, chat_id, messageId="an-older-answer") == {
        "status": "none",
        "messageId": None,
    }
    assert relay_answer(client, got.parts[0]["messageId"])["status"] in ("pending", "streaming")
    stop(client, chat_id)
    read_more(got)
    resp.close()
    assert got.types[-1] == "abort"


def test_a_failed_answer_ends_with_an_error_part(client: Client) -> None:
    chat_id = new_id()
    got, _ = send(client, default_body(chat_id, "Fail [demo:fail-after=5] [demo:words=50]"))
    message_id = got.parts[0]["messageId"]
    content = relay_answer(client, message_id)["content"]
    for seen in (got, resume(client, chat_id)):
        assert seen.done and seen.parts[0] == {"type": "start", "messageId": message_id}
        # No text-end and no finish: the part stays streaming, the client shows the error.
        assert seen.shape == ["start", "text-start", "text-delta", "error"]
        assert seen.parts[-1]["errorText"].startswith("generation_failed: demo generator failed")
        assert seen.text == content and content


def test_a_retried_answer_replays_as_one_text_part(client: Client, stack: Stack) -> None:
    chat_id = new_id()
    got, resp = send(client, default_body(chat_id, f"Retry me {MEDIUM}"), stop_after_deltas=3)
    message_id = got.parts[0]["messageId"]
    stop(client, chat_id)
    read_more(got)
    resp.close()
    stream_id = relay_answer(client, message_id)["streamId"]
    retried = subprocess.run(
        [str(BIN / "celery"), "-A", "workers", "streams", "retry", stream_id],
        env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert retried.returncode == 0, retried.stderr
    # The log now holds chunks, cancelled, resumed, chunks ..., done: the replay skips the
    # earlier end and the marker, so the continued answer is one text part.
    again = resume(client, chat_id)
    final = relay_answer(client, message_id)
    assert final["status"] == "complete"
    assert_finished(again, message_id, final["content"])
    assert again.text.startswith(got.text) and len(again.text) > len(got.text)
    events = client.sse(f"/api/v1/streams/{stream_id}/events")[1]
    assert "resumed" in [e["type"] for e in events]  # it really was a retried stream


def test_an_expired_log_is_replayed_from_sql(client: Client, stack: Stack) -> None:
    chat_id = new_id()
    got, _ = send(client, default_body(chat_id, "Expire me [demo:words=30]"))
    message_id = got.parts[0]["messageId"]
    stream_id = relay_answer(client, message_id)["streamId"]
    redis = stack.redis()  # the stack's own Redis database; only this stream's keys
    assert redis.delete(log_key(stream_id), state_key(stream_id)) == 2
    replayed = resume(client, chat_id)
    assert not redis.exists(log_key(stream_id))  # served from SQL, not a rebuilt log
    assert_finished(replayed, message_id, got.text)


def test_chat_ids_are_scoped_per_user(stack: Stack) -> None:
    alice, bob = stack.client(), stack.client()
    chat_id = new_id()
    got, resp = send(alice, default_body(chat_id, f"Alice's {LONG}"), stop_after_deltas=1)
    alices = got.parts[0]["messageId"]
    # Bob names the same chat id: it is not Alice's chat, and nothing about it leaks.
    assert resume(bob, chat_id).status == 204
    assert stop(bob, chat_id) == {"status": "none", "messageId": None}
    assert hydrate(bob, chat_id) == []
    bobs_turn, _ = send(bob, default_body(chat_id, "Bob's own [demo:words=5]"))
    assert bobs_turn.status == 200 and bobs_turn.parts[0]["messageId"] != alices
    assert [m["id"] for m in hydrate(bob, chat_id)][1] == bobs_turn.parts[0]["messageId"]
    assert len(hydrate(alice, chat_id)) == 2
    assert relay_answer(alice, alices)["status"] in ("pending", "streaming")  # not stopped
    # Chats nobody posted: 204, even for an id no chat can have.
    for unknown in (new_id(), "a.b", "x" * 65):
        assert resume(alice, unknown).status == 204
    stop(alice, chat_id)
    read_more(got)
    resp.close()


def test_requests_are_checked_like_the_rest_of_the_api(client: Client) -> None:
    def post(body: Any, **headers: str) -> requests.Response:
        return client.request("POST", API, json=body, headers=headers)

    def error(resp: requests.Response) -> tuple[int, str]:
        return resp.status_code, resp.json()["error"]["code"]

    chat_id = new_id()
    assert error(post({"messages": [user_message("hi")]})) == (400, "bad_request")
    assert error(post(default_body("no spaces", "hi"))) == (400, "bad_request")
    assert error(post({**default_body(chat_id, "hi"), "trigger": "regenerate-message"})) == (
        400, "unsupported_trigger",
    )  # fmt: skip
    assert error(post({**default_body(chat_id, "hi"), "messageId": "m1"})) == (
        400, "unsupported_trigger",
    )  # fmt: skip
    no_text = {"id": chat_id, "message": {"id": "m", "role": "user", "parts": [{"type": "file"}]}}
    assert error(post(no_text)) == (400, "invalid_message")
    assert error(post(default_body(chat_id, "hi"), Origin="https://evil.example")) == (
        403, "forbidden_origin",
    )  # fmt: skip
    # The default body carries the whole history: more than RELAY_MAX_REQUEST_BYTES is fine.
    history = [user_message("x" * 30_000) for _ in range(10)]
    body = default_body(chat_id, f"Busy {LONG}", history)
    assert len(json.dumps(body)) > 256 * 1024
    got, resp = send(client, body, stop_after_deltas=1)
    assert got.status == 200
    # A second turn while the answer streams: the busy policy, as JSON the SDK shows.
    assert error(post(default_body(chat_id, "again"))) == (409, "chat_busy")
    interrupt = {**default_body(chat_id, "Interrupt [demo:words=5]"), "interrupt": True}
    interrupted = client.http.post(client.url(API), json=interrupt, stream=True, timeout=60)
    read_more(got)
    resp.close()
    assert got.types[-1] == "abort"
    assert read_ui(interrupted).types[-1] == "finish"
    wait_for(lambda: len(hydrate(client, chat_id)) == 4)


def test_a_web_process_going_away_cuts_the_connection(stack: Stack) -> None:
    """A clean end without finish would look final to the SDK: the body is cut instead, which
    the SDK takes as a network error it can resume from (on another process)."""
    web, port = stack.start_web()
    client = stack.client(f"http://127.0.0.1:{port}")
    chat_id = new_id()
    got, resp = send(client, default_body(chat_id, f"Going away {MEDIUM}"), stop_after_deltas=3)
    os.kill(web.pid, signal.SIGTERM)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        read_more(got)
    resp.close()
    web.popen.wait(30)
    assert not got.done and got.types[-1] == "text-delta"
    assert "Traceback" not in web.output() and "Error handling request" not in web.output()
    # The SDK reconnects, here to the stack's web process, and gets the whole answer.
    other = stack.client()
    other.http.cookies = client.http.cookies
    message_id = got.parts[0]["messageId"]
    again = resume(other, chat_id)
    assert_finished(again, message_id, relay_answer(other, message_id)["content"])
    assert again.text.startswith(got.text)


def keyed_send(
    client: Client, body: dict[str, Any], key: str, stop_after_deltas: int | None = None
) -> tuple[UIStream, requests.Response]:
    resp = client.http.post(
        client.url(API), json=body, headers={"Idempotency-Key": key}, stream=True, timeout=60
    )
    return read_ui(resp, stop_after_deltas), resp


def test_a_repeated_send_with_its_idempotency_key_replays_the_same_answer(
    client: Client,
) -> None:
    """The same key and body start nothing new: the repeat gets the first send's answer from
    its start (while it streams, and after it ended); another body with the key is 422."""
    chat_id, key = new_id(), f"send-{new_id()}"
    body = default_body(chat_id, "Only once [demo:words=150]")
    first, first_resp = keyed_send(client, body, key, stop_after_deltas=2)
    message_id = first.parts[0]["messageId"]
    first_resp.close()  # a flaky network: the client never saw the rest, and sends again
    again, again_resp = keyed_send(client, body, key)
    assert again_resp.headers["Idempotent-Replayed"] == "true"
    content = relay_answer(client, message_id)["content"]
    assert_finished(again, message_id, content)
    later, _ = keyed_send(client, body, key)  # after the end too: no resume window applies
    assert_finished(later, message_id, content)
    assert [m["role"] for m in hydrate(client, chat_id)] == ["user", "assistant"]
    other = client.request(
        "POST", API, json=default_body(chat_id, "Something else"), headers={"Idempotency-Key": key}
    )
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    # Another key is another turn; a first send that failed does not hold its key.
    fresh, _ = keyed_send(client, default_body(chat_id, "Next [demo:words=5]"), f"k-{new_id()}")
    assert fresh.parts[0]["messageId"] != message_id and fresh.types[-1] == "finish"
    bad_key = f"bad-{new_id()}"
    refused = client.request(
        "POST", API, json=default_body("no spaces", "hi"), headers={"Idempotency-Key": bad_key}
    )
    assert refused.status_code == 400
    retried, _ = keyed_send(client, default_body(chat_id, "Retry [demo:words=5]"), bad_key)
    assert retried.status == 200 and retried.types[-1] == "finish"


def test_idempotency_keys_of_the_ai_sdk_belong_to_their_user(stack: Stack) -> None:
    alice, bob = stack.client(), stack.client()
    key = f"shared-{new_id()}"
    mine, _ = keyed_send(alice, default_body(new_id(), "Mine [demo:words=5]"), key)
    theirs, _ = keyed_send(bob, default_body(new_id(), "Mine [demo:words=5]"), key)
    assert mine.parts[0]["messageId"] != theirs.parts[0]["messageId"]


def test_a_replay_of_a_deleted_chat_is_404(client: Client) -> None:
    chat_id, key = new_id(), f"gone-{new_id()}"
    body = default_body(chat_id, "Delete me [demo:words=5]")
    assert keyed_send(client, body, key)[0].types[-1] == "finish"
    [chat] = client.get_json("/api/v1/chats")["chats"]  # this new user's only chat
    assert client.request("DELETE", f"/api/v1/chats/{chat['id']}").status_code == 204
    again = client.request("POST", API, json=body, headers={"Idempotency-Key": key})
    assert again.status_code == 404 and again.json()["error"]["code"] == "stream_not_found"


def test_an_answer_left_under_cancel_after_ends_with_an_abandoned_abort(client: Client) -> None:
    """The detach policy through the AI SDK: the page that sent the message closes (its
    response was the only viewer), nobody resumes, and the answer is cancelled."""
    chat_id = new_id()
    body = default_body(chat_id, "Leave me [demo:words=400] [demo:rate=20]")
    body["onDetach"] = {"policy": "cancel-after", "seconds": 1}
    got, resp = send(client, body, stop_after_deltas=3)
    message_id = got.parts[0]["messageId"]
    resp.close()  # the tab closes

    def ended() -> dict[str, Any] | None:
        message = relay_answer(client, message_id)
        return message if message["status"] in {"complete", "cancelled", "failed"} else None

    answer = wait_for(ended, timeout=30)
    assert answer["status"] == "cancelled"
    seen = resume(client, chat_id)
    assert seen.done and seen.shape == ["start", "text-start", "text-delta", "text-end", "abort"]
    assert seen.parts[-1] == {"type": "abort", "reason": "abandoned"}
    assert seen.text == answer["content"] and seen.text.startswith(got.text)
