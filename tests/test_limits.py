"""Limits with clear answers (429 + Retry-After): running answers per user, posts per minute,
new guests per address, listing page size; and a flood from one user leaves the queue to
everyone else. Against a real web process with the limits on (the test stacks turn them off)."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import requests

from models import keys
from tests.client import Client, wait_for
from tests.conftest import Stack

# Paced to outlast the flood on a busy machine (about 100 s); the test cancels them after.
LONG = "[demo:words=400] [demo:rate=5]"


def limited(stack: Stack, **env: str) -> Client:
    _web, port = stack.start_web_with(
        **{"RELAY_MAX_RUNNING_PER_USER": "0", "RELAY_POSTS_PER_MINUTE": "0",
           "RELAY_NEW_GUESTS_PER_MINUTE": "0", **env}
    )  # fmt: skip
    return stack.client(f"http://127.0.0.1:{port}")


def assert_429(resp: requests.Response, code: str) -> None:
    assert resp.status_code == 429, resp.text
    assert resp.json()["error"]["code"] == code
    assert 1 <= int(resp.headers["Retry-After"]) <= 60


def test_a_flood_from_one_user_is_refused_past_its_running_answers(stack: Stack) -> None:
    """Two hundred posts from one user: three answers run, the rest are 429 at once; another
    user's answer is not queued behind the flood and streams at once."""
    flooder = limited(stack, RELAY_MAX_RUNNING_PER_USER="3")
    flooder.get_json("/api/v1/chats")  # one session for all the posts

    def post(i: int) -> requests.Response:
        return flooder.request("POST", "/api/v1/chat", json={"message": f"flood {i} {LONG}"})

    with ThreadPoolExecutor(max_workers=20) as pool:
        replies = list(pool.map(post, range(200)))
    accepted = [r for r in replies if r.status_code == 202]
    assert len(accepted) == 3, [r.status_code for r in replies]
    # Past the three: 429 too_many_running, or, for a post that waited its turn to be counted
    # for 10 s on a busy machine, 429 rate_limited ("your other posts are still being
    # handled; retry"). Never another answer.
    refused = [r for r in replies if r.status_code != 202]
    for resp in refused:
        assert_429(resp, resp.json()["error"]["code"])
        assert resp.json()["error"]["code"] in ("too_many_running", "rate_limited"), resp.text
    assert any(r.json()["error"]["code"] == "too_many_running" for r in refused)
    other = Client(flooder.base_url)
    posted = other.post_chat("My turn [demo:words=10]")
    assert other.attach(posted["streamId"]).last["type"] == "done"
    # It did not wait for the flood: the three flood answers (about 100 s each) still run.
    for resp in accepted:
        assert flooder.stream(resp.json()["streamId"])["status"] in ("queued", "running")
    # Cancelling one of the three frees a place.
    flooder.request("POST", f"/api/v1/streams/{accepted[0].json()['streamId']}/cancel")
    flooder.wait_status(accepted[0].json()["streamId"], {"cancelled"})
    last = post(999)
    assert last.status_code == 202
    for resp in [*accepted[1:], last]:  # none left running on the shared worker
        flooder.request("POST", f"/api/v1/streams/{resp.json()['streamId']}/cancel")
    # Every post released the user's admission lock (after its answer or its refusal).
    data = stack.redis()
    wait_for(lambda: not list(data.scan_iter(match=keys.post_lock("*"))), timeout=10)


def test_posts_per_minute(stack: Stack) -> None:
    client = limited(stack, RELAY_POSTS_PER_MINUTE="4")
    for i in range(4):
        client.post_chat(f"quick {i} [demo:words=5]")
    assert_429(client.request("POST", "/api/v1/chat", json={"message": "one more"}), "rate_limited")
    other = Client(client.base_url)  # another user has a budget of their own
    other.post_chat("mine [demo:words=5]")


def test_new_guests_per_address(stack: Stack) -> None:
    """Cookie-less posts each make a new guest: past the limit per address they are 429,
    while a guest that keeps its cookie goes on posting."""
    keeper = limited(stack, RELAY_NEW_GUESTS_PER_MINUTE="3")
    keeper.post_chat("I keep my cookie [demo:words=5]")
    codes = []
    for i in range(3):
        fresh = Client(keeper.base_url)
        resp = fresh.request("POST", "/api/v1/chat", json={"message": f"new guest {i}"})
        codes.append(resp.status_code)
    assert codes == [202, 202, 429], codes
    assert_429(resp, "rate_limited")
    keeper.post_chat("still fine [demo:words=5]")


def test_the_chat_list_is_paged(stack: Stack) -> None:
    client = limited(stack, RELAY_LIST_PAGE_SIZE="3")
    for i in range(4):
        client.post_chat(f"chat {i} [demo:words=5]")
    assert len(client.get_json("/api/v1/chats")["chats"]) == 3
    assert len(client.get_json("/api/v1/chats?limit=2")["chats"]) == 2
    for bad in ("0", "4", "x", "-1", uuid.uuid4().hex):
        resp = client.request("GET", f"/api/v1/chats?limit={bad}")
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "bad_request"
