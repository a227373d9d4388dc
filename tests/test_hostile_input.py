"""No 500 on any input: strings SQL cannot store, ids no row can have, JSON nested past the
parser's limit, wrong types; and a new guest's parallel first posts. Against the real web
process, on SQLite and (when configured) PostgreSQL, where a NUL in a query is an error."""

from __future__ import annotations

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from websockets.exceptions import ConnectionClosed

from tests.client import Client

# Raw JSON bodies: json.dumps would refuse to write a lone surrogate escape as such.
SURROGATE = '{"message": "a\\ud800b"}'
DEEP = '{"message": ' + "[" * 5000 + "]" * 5000 + "}"

BODIES: list[tuple[str, str, int]] = [
    ("lone surrogate in message", SURROGATE, 400),
    ("lone surrogate in chatId", '{"message": "hi", "chatId": "a\\udfffb"}', 404),
    ("NUL in message", '{"message": "a\\u0000b"}', 400),
    ("NUL in chatId", '{"message": "hi", "chatId": "a\\u0000b"}', 404),
    ("chatId no id can be", '{"message": "hi", "chatId": "../../etc"}', 404),
    ("deep nesting", DEEP, 400),
    ("deep nesting in an object", '{"a": ' + '{"a": ' * 3000 + "1" + "}" * 3001, 400),
    ("not JSON", "message=hi", 400),
    ("not an object", "[1, 2]", 400),
    ("message a number", '{"message": 5}', 400),
    ("message a list", '{"message": ["hi"]}', 400),
    ("message null", '{"message": null}', 400),
    ("chatId a number", '{"message": "hi", "chatId": 5}', 400),
    ("model a number", '{"message": "hi", "model": 5}', 400),
    ("model with a NUL", '{"message": "hi", "model": "de\\u0000mo"}', 400),
    ("huge number", '{"message": "hi", "chatId": 1' + "0" * 5000 + "}", 400),
]

PATHS = [
    "/api/v1/streams/a%00b",
    "/api/v1/streams/a%00b/events",
    "/api/v1/chats/a%00b",
    "/api/v1/chats/%ED%A0%80",  # the UTF-8 bytes of a lone surrogate
    "/api/v1/chat?chatId=a%00b",
    "/api/v1/chat?chatId=%ED%A0%80",
    "/api/v1/streams/x/events?after=%00",
    "/api/v1/streams/" + "x" * 300,
]


def assert_error_shape(resp: requests.Response, status: int | None = None) -> None:
    assert 400 <= resp.status_code < 500, (resp.status_code, resp.text[:300])
    if status is not None:
        assert resp.status_code == status, resp.text[:300]
    body = resp.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body


@pytest.mark.parametrize(("what", "body", "status"), BODIES, ids=[b[0] for b in BODIES])
def test_a_hostile_post_body_is_a_client_error(
    client: Client, what: str, body: str, status: int
) -> None:
    resp = client.request(
        "POST", "/api/v1/chat", data=body.encode(), headers={"Content-Type": "application/json"}
    )
    assert_error_shape(resp, status)


@pytest.mark.parametrize("path", PATHS)
def test_hostile_paths_and_queries_are_client_errors(client: Client, path: str) -> None:
    client.post_chat("make me a user [demo:words=5]")
    for method in ("GET", "POST") if "/streams/" in path and "events" not in path else ("GET",):
        url = path + "/cancel" if method == "POST" else path
        assert_error_shape(client.request(method, url))


def test_a_hostile_socket_message_is_a_close_code_not_a_crash(client: Client) -> None:
    posted = client.post_chat("Talk to me [demo:words=200]")
    with client.connect_ws(f"/api/v1/streams/{posted['streamId']}/ws") as ws:
        ws.recv()
        ws.send("[" * 20_000 + "]" * 20_000)  # nested past any parser's limit
        with contextlib.suppress(ConnectionClosed):
            for _ in ws:
                pass
        assert ws.close_code == 4400  # "client messages are ..." (bad request)
    assert client.stream(posted["streamId"])["status"] in ("running", "done")


def test_a_new_guests_parallel_first_posts_all_succeed(client: Client) -> None:
    """Forty first posts at once from a guest whose row does not exist yet: the row is
    inserted once (insert-or-ignore), and no post fails."""
    client.get_json("/api/v1/chats")  # a session cookie, no user row yet
    assert client.http.cookies

    def post(i: int) -> int:
        body: dict[str, Any] = {"message": f"parallel {i} [demo:words=5]"}
        return client.request("POST", "/api/v1/chat", json=body).status_code

    with ThreadPoolExecutor(max_workers=40) as pool:
        codes = list(pool.map(post, range(40)))
    assert codes == [202] * 40, codes
    listed = client.get_json("/api/v1/chats")
    assert len(listed["chats"]) == 40, json.dumps(listed)[:300]


@pytest.mark.parametrize(
    ("what", "url", "headers", "status", "code"),
    [
        (
            "a request line past 4,094 bytes",
            "/api/v1/chats?" + "limit=5&" * 600,
            {},
            414,
            "request_uri_too_large",
        ),
        (
            "a header past 8,190 bytes",
            "/api/v1/chats",
            {"X-Long": "x" * 9000},
            431,
            "request_header_fields_too_large",
        ),
    ],
    ids=["414", "431"],
)
def test_requests_gunicorn_refuses_get_a_json_error(
    client: Client, what: str, url: str, headers: dict[str, str], status: int, code: str
) -> None:
    """gunicorn answers these before relay reads the request: in relay's error shape too
    (ops/httperrors.py), as the OpenAPI document says for every operation."""
    resp = client.request("GET", url, headers=headers)
    assert resp.headers["Content-Type"] == "application/json"
    assert_error_shape(resp, status)
    assert resp.json()["error"]["code"] == code
    assert "chats" in client.get_json("/api/v1/chats")  # the process serves on
