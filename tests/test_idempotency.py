"""Idempotency-Key on POST /api/v1/chat: a retried post gets the first answer and starts
nothing new; the same key with another body is 422; racing duplicates start one answer."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

from tests.client import Client
from tests.conftest import Stack

BODY = {"message": "Only once, please [demo:words=5]"}


def post(client: Client, key: str, body: dict[str, str] = BODY) -> tuple[int, dict[str, object]]:
    resp = client.request("POST", "/api/v1/chat", json=body, headers={"Idempotency-Key": key})
    return resp.status_code, resp.json()


def test_a_retried_post_gets_the_first_answer_and_starts_nothing(client: Client) -> None:
    status, first = post(client, "k-1")
    assert status == 202
    again, second = post(client, "k-1")
    assert (again, second) == (202, first)
    client.attach(str(first["streamId"]))
    assert len(client.get_json("/api/v1/chats")["chats"]) == 1
    other, third = post(client, "k-2")  # another key is another post
    assert other == 202 and third["streamId"] != first["streamId"]


def test_the_same_key_with_another_body_is_refused(client: Client) -> None:
    assert post(client, "k-3")[0] == 202
    status, body = post(client, "k-3", {"message": "something else"})
    assert status == 422 and body["error"]["code"] == "idempotency_key_reused"  # type: ignore[index]


def test_keys_belong_to_their_user(client: Client, stack: Stack) -> None:
    status, mine = post(client, "shared-key")
    other = stack.client()
    other_status, theirs = post(other, "shared-key")
    assert status == other_status == 202 and theirs["streamId"] != mine["streamId"]


def test_racing_duplicates_start_one_answer(client: Client) -> None:
    client.get_json("/api/v1/chats")  # one guest for all of them
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(lambda _: post(client, "k-race"), range(12)))
    accepted = {json.dumps(body, sort_keys=True) for status, body in results if status == 202}
    assert len(accepted) == 1, results  # every 202 is the same answer
    others = [body for status, body in results if status != 202]
    assert all(b["error"]["code"] == "idempotency_in_progress" for b in others), others  # type: ignore[index]
    assert len(client.get_json("/api/v1/chats")["chats"]) == 1


def test_a_bad_key_is_a_client_error(client: Client) -> None:
    status, body = post(client, "x" * 300)
    assert status == 400 and body["error"]["code"] == "bad_request"  # type: ignore[index]
