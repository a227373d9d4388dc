"""The detach policy against the real stack: an answer nobody watches any more is cancelled
after its policy's seconds (reason ``abandoned``, text kept), and never one that a viewer
stayed on or came back to in time, even through a web process killed under its viewer."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import pytest

from tests.client import Attach, Client, assert_coherent, chunk_text, wait_for
from tests.conftest import Stack

SLOW = "[demo:words=300] [demo:rate=10]"  # about 30 s: long past every policy below


def cancel_after(seconds: int) -> dict[str, Any]:
    return {"onDetach": {"policy": "cancel-after", "seconds": seconds}}


def whole_log(client: Client, stream_id: str) -> Attach:
    """A fresh viewer's read of the ended stream: every event, the terminal one last."""
    seen = client.attach(stream_id, timeout=60)
    assert seen.events and seen.last["type"] in {"done", "cancelled", "error"}
    return seen


def unwatched_or_ended(client: Client, stream_id: str) -> dict[str, Any] | None:
    shown = client.stream(stream_id)
    return shown if shown["status"] != "running" or not shown["onDetach"]["watched"] else None


def test_an_answer_nobody_watches_is_cancelled_as_abandoned_and_keeps_its_text(
    client: Client,
) -> None:
    posted = client.post_chat(f"Leave me {SLOW}", **cancel_after(2))
    sid, chat_id = posted["streamId"], posted["chatId"]
    first = client.attach(sid, until=lambda a: len(a.events) >= 5)  # watched, then left
    assert client.stream(sid)["onDetach"]["seconds"] == 2
    # While nobody watches, the stream says so and when it will be cancelled.
    countdown = wait_for(lambda: unwatched_or_ended(client, sid))
    if countdown["status"] == "running":
        assert countdown["onDetach"]["policy"] == "cancel-after"
        assert countdown["onDetach"]["cancelAt"] is not None
    ended = client.wait_status(sid, {"cancelled", "done", "failed"}, timeout=30)
    assert ended["status"] == "cancelled"
    assert ended["endReason"] == "abandoned"
    assert "cancelAt" not in ended["onDetach"]  # only while it runs
    seen = whole_log(client, sid)
    assert seen.events[: len(first.events)] == first.events
    assert seen.last == {"type": "cancelled", "seq": seen.last["seq"], "reason": "abandoned"}
    assert_coherent(client, chat_id, seen.events)  # the text so far is kept, seq 1..n
    answer = client.answer(chat_id)
    assert answer["status"] == "cancelled" and answer["content"] == seen.text
    assert 0 < len(chunk_text(seen.events).split()) < 300  # stopped well before the end


def test_an_answer_never_watched_counts_from_its_post(client: Client) -> None:
    posted = client.post_chat(f"Nobody comes {SLOW}", **cancel_after(1))
    ended = client.wait_status(posted["streamId"], {"cancelled", "done", "failed"}, timeout=30)
    assert (ended["status"], ended["endReason"]) == ("cancelled", "abandoned")


def test_a_viewer_that_stays_keeps_the_answer_going(client: Client) -> None:
    posted = client.post_chat("Stay [demo:words=40] [demo:rate=10]", **cancel_after(1))
    sid = posted["streamId"]
    watched = client.attach(sid, timeout=60)  # about 4 s, four times the policy
    assert watched.last["type"] == "done"
    shown = client.stream(sid)
    assert shown["status"] == "done" and shown["endReason"] is None
    assert shown["onDetach"] == {"policy": "cancel-after", "seconds": 1}
    assert_coherent(client, posted["chatId"], watched.events)


def test_a_viewer_back_in_time_keeps_the_answer_going(client: Client) -> None:
    posted = client.post_chat("Come back [demo:words=50] [demo:rate=10]", **cancel_after(3))
    sid = posted["streamId"]
    first = client.attach(sid, until=lambda a: len(a.events) >= 5)
    time.sleep(1.5)  # gone for half the policy
    rest = client.attach(sid, after=first.last["seq"], timeout=60)
    assert rest.last["type"] == "done"
    assert client.stream(sid)["endReason"] is None
    assert_coherent(client, posted["chatId"], first.events + rest.events)


def test_continue_is_the_default_and_goes_on_unwatched(client: Client) -> None:
    posted = client.post_chat("Unwatched [demo:words=30]")
    sid = posted["streamId"]
    assert client.stream(sid)["onDetach"] == {"policy": "continue"}
    ended = client.wait_status(sid, {"cancelled", "done", "failed"}, timeout=30)
    assert ended["status"] == "done" and ended["endReason"] is None


@pytest.mark.parametrize(
    "on_detach",
    [
        "sometimes",
        {"policy": "cancel-after", "seconds": 0},
        {"policy": "cancel-after", "seconds": 86401},
        {"policy": "cancel-after", "seconds": "5"},
        {"policy": "cancel-after", "seconds": 2.5},
        {"policy": "cancel-after", "seconds": True},
        {"policy": "cancel-after", "after": 5},
        ["cancel-after", 5],
    ],
)
def test_a_bad_policy_is_refused(client: Client, on_detach: Any) -> None:
    resp = client.request("POST", "/api/v1/chat", json={"message": "hi", "onDetach": on_detach})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_parameter" and "onDetach" in error["message"]


def test_the_deployment_default_applies_and_a_request_may_opt_out(stack: Stack) -> None:
    _web, port = stack.start_web_with(RELAY_ON_DETACH="cancel-after", RELAY_ON_DETACH_SECONDS="1")
    client = stack.client(f"http://127.0.0.1:{port}")
    defaulted = client.post_chat(f"Default policy {SLOW}")
    shown = client.stream(defaulted["streamId"])["onDetach"]
    assert (shown["policy"], shown["seconds"]) == ("cancel-after", 1)
    kept = client.post_chat("Opted out [demo:words=30]", onDetach="continue")
    ended = client.wait_status(defaulted["streamId"], {"cancelled", "done"}, timeout=30)
    assert (ended["status"], ended["endReason"]) == ("cancelled", "abandoned")
    done = client.wait_status(kept["streamId"], {"cancelled", "done"}, timeout=30)
    assert (done["status"], done["endReason"]) == ("done", None)


def test_a_viewer_whose_web_process_is_killed_counts_until_it_comes_back(stack: Stack) -> None:
    """Two answers watched through a second web process that is then SIGKILLed: one viewer
    comes back (on the first web process) within the policy, the other never does. The first
    answer ends done; the second is cancelled as abandoned once the dead process's lease and
    then the policy have run out."""
    owner = stack.client()
    # Its hub checks every second: its lease (2.5 checks) outlives it by 2.5 s at most.
    web, port = stack.start_web_with(RELAY_HUB_CHECK_S="1")
    other = Client(f"http://127.0.0.1:{port}")
    other.http = owner.http  # the same user, through the other process
    back = owner.post_chat("Back [demo:words=100] [demo:rate=10]", **cancel_after(4))
    gone = owner.post_chat(f"Gone {SLOW}", **cancel_after(4))
    seen: dict[str, list[dict[str, Any]]] = {}
    with contextlib.ExitStack() as sockets:
        for posted in (back, gone):
            path = f"/api/v1/streams/{posted['streamId']}/ws"
            ws = sockets.enter_context(other.connect_ws(path))
            seen[posted["streamId"]] = [json.loads(ws.recv(timeout=30))]
        web.kill()  # SIGKILL: no goodbye, no lease ended
    time.sleep(2)
    first = seen[back["streamId"]]
    rest = owner.attach(back["streamId"], after=first[-1]["seq"], timeout=60)
    assert rest.last["type"] == "done"
    assert_coherent(owner, back["chatId"], first + rest.events)
    ended = owner.wait_status(gone["streamId"], {"cancelled", "done", "failed"}, timeout=60)
    assert (ended["status"], ended["endReason"]) == ("cancelled", "abandoned")


@pytest.mark.stack_env(RELAY_ON_DETACH="cancel-after", RELAY_ON_DETACH_SECONDS="1")
def test_an_answer_abandoned_in_the_queue_is_never_started(isolated_stack: Stack) -> None:
    """No worker until the policy has run out: the claim finds the answer abandoned and ends
    it at once, before calling the model."""
    client = isolated_stack.client()
    posted = client.post_chat("Queued too long [demo:words=30]")
    sid = posted["streamId"]
    assert client.stream(sid)["status"] == "queued"
    time.sleep(1.5)
    isolated_stack.start_worker("late")
    ended = client.wait_status(sid, {"cancelled", "done", "failed"}, timeout=60)
    assert (ended["status"], ended["endReason"]) == ("cancelled", "abandoned")
    seen = whole_log(client, sid)
    assert seen.events == [{"type": "cancelled", "seq": 1, "reason": "abandoned"}]
    assert client.answer(posted["chatId"])["content"] == ""


def test_metrics_count_abandoned_answers(stack: Stack) -> None:
    client = stack.client()
    posted = client.post_chat(f"Counted {SLOW}", **cancel_after(1))
    client.wait_status(posted["streamId"], {"cancelled"}, timeout=30)
    body = client.request("GET", "/metrics").text
    abandoned = [line for line in body.splitlines() if line.startswith("relay_streams_abandoned ")]
    assert abandoned and float(abandoned[0].split()[1]) >= 1
