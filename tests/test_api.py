"""The HTTP API: identity and ownership, bad input, the busy policy, the resume endpoint."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.client import Client
from tests.conftest import Stack


def _error(resp: Any, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def test_post_chat_returns_ids_and_links(client: Client) -> None:
    resp = client.request("POST", "/api/v1/chat", json={"message": "hi [demo:words=10]"})
    assert resp.status_code == 202
    body = resp.json()
    sid = body["streamId"]
    assert body["ws"] == f"/api/v1/streams/{sid}/ws"
    assert body["events"] == f"/api/v1/streams/{sid}/events"
    assert "session" in client.http.cookies  # a guest identity was handed out
    status = client.stream(sid)
    assert status["chatId"] == body["chatId"] and status["messageId"] == body["messageId"]
    assert status["status"] in {"queued", "running", "done"}
    client.attach(sid)
    chat = client.get_json(f"/api/v1/chats/{body['chatId']}")
    roles = [(m["role"], m["status"]) for m in chat["messages"]]
    assert roles == [("user", "complete"), ("assistant", "complete")]
    assert chat["messages"][0]["content"] == "hi [demo:words=10]"
    assert chat["messages"][1]["streamId"] == sid
    assert chat["messages"][0]["id"] == body["userMessageId"]
    assert chat["messages"][1]["id"] == body["messageId"]
    listed = client.get_json("/api/v1/chats")["chats"]
    assert [c["id"] for c in listed] == [body["chatId"]]


def test_followup_message_continues_the_chat(client: Client) -> None:
    first = client.post_chat("first question [demo:words=10]")
    client.attach(first["streamId"])
    second = client.post_chat("second question [demo:words=10]", chat_id=first["chatId"])
    assert second["chatId"] == first["chatId"]
    client.attach(second["streamId"])
    chat = client.get_json(f"/api/v1/chats/{first['chatId']}")
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant"] * 2
    assert len(client.get_json("/api/v1/chats")["chats"]) == 1


def test_other_users_get_404_for_everything(client: Client, stack: Stack) -> None:
    posted = client.post_chat("mine [demo:words=10]")
    client.attach(posted["streamId"])
    other = stack.client()
    sid, cid = posted["streamId"], posted["chatId"]
    _error(other.request("GET", f"/api/v1/chats/{cid}"), 404, "chat_not_found")
    _error(other.request("GET", f"/api/v1/streams/{sid}"), 404, "stream_not_found")
    _error(other.request("GET", f"/api/v1/streams/{sid}/events"), 404, "stream_not_found")
    _error(other.request("POST", f"/api/v1/streams/{sid}/cancel"), 404, "stream_not_found")
    _error(other.request("GET", f"/api/v1/chat?chatId={cid}"), 404, "chat_not_found")
    resp = other.request("POST", "/api/v1/chat", json={"chatId": cid, "message": "hijack"})
    _error(resp, 404, "chat_not_found")
    assert other.get_json("/api/v1/chats")["chats"] == []
    got = other.attach(sid)
    assert got.events == [] and got.close_code == 4404
    got = other.attach("", path=f"/api/v1/chats/{cid}/ws")
    assert got.events == [] and got.close_code == 4404
    # Nothing the other user tried changed the owner's chat.
    chat = client.get_json(f"/api/v1/chats/{cid}")
    assert len(chat["messages"]) == 2


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"data": "{not json", "headers": {"Content-Type": "application/json"}}, 400,
         "invalid_json"),
        ({"data": "", "headers": {"Content-Type": "application/json"}}, 400, "invalid_json"),
        ({"json": ["a", "list"]}, 400, "invalid_json"),
        ({"json": {}}, 400, "invalid_message"),
        ({"json": {"message": ""}}, 400, "invalid_message"),
        ({"json": {"message": "   \n "}}, 400, "invalid_message"),
        ({"json": {"message": 42}}, 400, "invalid_message"),
        ({"json": {"message": "x" * 32_001}}, 413, "message_too_large"),
        ({"data": "x" * 300_000, "headers": {"Content-Type": "application/json"}}, 413,
         "request_too_large"),
        ({"json": {"message": "hi", "chatId": 7}}, 400, "bad_request"),
        ({"json": {"message": "hi", "chatId": "no-such-chat"}}, 404, "chat_not_found"),
    ],
)  # fmt: skip
def test_bad_posts_get_a_4xx_and_store_nothing(
    client: Client, kwargs: dict[str, Any], status: int, code: str
) -> None:
    posted = client.post_chat("keep me [demo:words=10]")
    client.attach(posted["streamId"])
    before = client.get_json(f"/api/v1/chats/{posted['chatId']}")
    _error(client.request("POST", "/api/v1/chat", **kwargs), status, code)
    assert client.get_json(f"/api/v1/chats/{posted['chatId']}") == before
    assert len(client.get_json("/api/v1/chats")["chats"]) == 1


def test_bad_after_and_unknown_ids(client: Client) -> None:
    posted = client.post_chat("after checks [demo:words=10]")
    sid = posted["streamId"]
    done = client.attach(sid)
    for bad in ("-1", "abc", "1.5", str(done.last["seq"] + 1)):
        _error(
            client.request("GET", f"/api/v1/streams/{sid}/events?after={bad}"), 400, "invalid_after"
        )
        got = client.attach(sid, path=f"/api/v1/streams/{sid}/ws?after={bad}")
        assert got.events == [] and got.close_code == 4400 and got.close_reason
    # Having seen the terminal event, a socket closes normally at once.
    got = client.attach(sid, after=done.last["seq"])
    assert got.events == [] and got.close_code == 1000
    _error(client.request("GET", "/api/v1/streams/nope"), 404, "stream_not_found")
    _error(client.request("GET", "/api/v1/chats/nope"), 404, "chat_not_found")
    _error(client.request("GET", "/api/v1/nothing-here"), 404, "not_found")
    _error(client.request("DELETE", "/api/v1/chat"), 405, "method_not_allowed")
    _error(client.request("GET", "/api/v1/chat"), 400, "bad_request")


def test_cancel_of_a_finished_stream_is_a_conflict(client: Client) -> None:
    posted = client.post_chat("finish first [demo:words=10]")
    client.attach(posted["streamId"])
    resp = client.request("POST", f"/api/v1/streams/{posted['streamId']}/cancel")
    _error(resp, 409, "stream_finished")
    assert client.answer(posted["chatId"])["status"] == "complete"


def test_busy_chat_rejects_a_second_message_unless_interrupting(client: Client) -> None:
    first = client.post_chat("long one [demo:words=600]")
    cid = first["chatId"]
    resp = client.request("POST", "/api/v1/chat", json={"chatId": cid, "message": "again"})
    _error(resp, 409, "chat_busy")
    second = client.post_chat("instead [demo:words=10]", chat_id=cid, interrupt=True)
    assert client.attach(first["streamId"]).last["type"] == "cancelled"
    assert client.attach(second["streamId"]).last["type"] == "done"
    messages = client.get_json(f"/api/v1/chats/{cid}")["messages"]
    assert [m["status"] for m in messages] == ["complete", "cancelled", "complete", "complete"]


def test_cross_site_socket_is_refused(client: Client) -> None:
    posted = client.post_chat("origin [demo:words=10]")
    path = f"/api/v1/streams/{posted['streamId']}/ws"
    with client.connect_ws(path, Origin="http://evil.example") as ws:
        with pytest.raises(Exception):  # noqa: B017 - closed by the server
            ws.recv(timeout=5)
        assert ws.close_code == 4403
    same = client.attach("", path=path)  # no Origin header (non-browser client) is fine
    assert same.last["type"] == "done"


def test_cross_site_writes_are_refused(client: Client) -> None:
    resp = client.request(
        "POST", "/api/v1/chat", json={"message": "forged"},
        headers={"Origin": "http://evil.example"},
    )  # fmt: skip
    _error(resp, 403, "forbidden_origin")
    assert client.get_json("/api/v1/chats")["chats"] == []
    same_site = client.request(
        "POST", "/api/v1/chat", json={"message": "mine [demo:words=5]"},
        headers={"Origin": client.base_url},
    )  # fmt: skip
    assert same_site.status_code == 202
    client.attach(same_site.json()["streamId"])


def test_bad_client_message_closes_the_socket_with_a_reason(client: Client) -> None:
    posted = client.post_chat("chatty client [demo:words=300]")
    with client.connect_ws(f"/api/v1/streams/{posted['streamId']}/ws") as ws:
        ws.recv(timeout=5)
        ws.send("hello?")
        with pytest.raises(Exception):  # noqa: B017 - closed by the server
            while True:
                ws.recv(timeout=5)
        assert ws.close_code == 4400
    # The generation itself is unaffected.
    assert client.attach(posted["streamId"]).last["type"] == "done"


def test_resume_endpoint(client: Client, stack: Stack) -> None:
    posted = client.post_chat("resume endpoint [demo:words=150]")
    cid = posted["chatId"]
    status, events = client.sse(f"/api/v1/chat?chatId={cid}", limit=5)
    assert status == 200 and [e["seq"] for e in events] == [1, 2, 3, 4, 5]
    status, rest = client.sse(f"/api/v1/chat?chatId={cid}", last_event_id=5)
    assert rest[-1]["type"] == "done"
    full = "".join(e["text"] for e in events + rest if e["type"] == "chunk")
    assert full == client.answer(cid)["content"]
    # Finished just now: the answer comes back whole, as one chunk plus done.
    status, snap = client.sse(f"/api/v1/chat?chatId={cid}")
    assert status == 200
    assert snap == [
        {"type": "chunk", "seq": 1, "text": full},
        {"type": "done", "seq": 2, "messageId": posted["messageId"]},
    ]


def test_resume_endpoint_answers_204_when_nothing_is_recent(stack: Stack) -> None:
    web, port = stack.start_web_with(RELAY_RESUME_FALLBACK_S="0.2")
    client = stack.client(f"http://127.0.0.1:{port}")
    posted = client.post_chat("old answer [demo:words=10]")
    client.attach(posted["streamId"])
    time.sleep(0.4)
    resp = client.request("GET", f"/api/v1/chat?chatId={posted['chatId']}")
    assert resp.status_code == 204 and resp.content == b""
    web.stop()


def test_health_readiness_and_metrics(client: Client) -> None:
    assert client.get_json("/healthz") == {"status": "ok"}
    assert client.get_json("/readyz") == {
        "status": "ok",
        "checks": {"redis": "ok", "database": "ok"},
    }
    posted = client.post_chat("measure me [demo:words=10]")
    client.attach(posted["streamId"])
    client.attach(posted["streamId"], after=3)
    metrics = client.request("GET", "/metrics").text
    assert 'relay_streams{status="done"}' in metrics
    assert 'relay_attaches_total{kind="resume",transport="ws"}' in metrics
    assert "relay_catchup_events_bucket" in metrics
    assert "relay_hub_dispatch_seconds_count" in metrics
    assert 'relay_viewers_connected{transport="ws"} 0.0' in metrics


def test_bearer_token_users(stack: Stack) -> None:
    import subprocess

    from tests.procs import BIN, ROOT

    out = subprocess.run(
        [str(BIN / "flask"), "--app", "web", "create-token", "api-user"],
        env=stack.env, cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    token = out.split("token ", 1)[1].strip()
    api = stack.client()
    api.http.headers["Authorization"] = f"Bearer {token}"
    posted = api.post_chat("as an API user [demo:words=10]")
    assert "session" not in api.http.cookies  # no cookie needed with a token
    assert api.attach(posted["streamId"]).last["type"] == "done"
    again = stack.client()
    again.http.headers["Authorization"] = f"Bearer {token}"
    assert [c["id"] for c in again.get_json("/api/v1/chats")["chats"]] == [posted["chatId"]]
    bad = stack.client()
    bad.http.headers["Authorization"] = "Bearer nope"
    _error(bad.request("GET", "/api/v1/chats"), 401, "unauthorized")
