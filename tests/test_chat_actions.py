"""The chat page's actions in the API: rename a chat (PATCH), search chats by title (?q=),
regenerate the last answer (it replaces the old one), and the models a post may name. Real
stack (gunicorn, Celery worker, Redis), on SQLite and (when configured) PostgreSQL."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy.orm import Session

from models.exceptions import IllegalTransition
from tests.client import Client
from tests.conftest import Stack, guest_chat
from web.chats import check_regenerable

SHORT = "[demo:words=5]"


def _error(resp: Any, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def _done_chat(client: Client, message: str = f"Tell me {SHORT}") -> dict[str, Any]:
    posted = client.post_chat(message)
    client.attach(posted["streamId"])
    return posted


def _keys(stack: Stack, stream_id: str) -> int:
    r = stack.redis()
    return int(r.exists(f"relay:{{{stream_id}}}:log", f"relay:{{{stream_id}}}:state"))


def _rename(client: Client, chat_id: str, title: Any, **kw: Any) -> Any:
    return client.request("PATCH", f"/api/v1/chats/{chat_id}", json={"title": title}, **kw)


# -- rename -----------------------------------------------------------------------------------


def test_rename_strips_the_title_and_keeps_the_chats_place(client: Client) -> None:
    posted = _done_chat(client)
    cid = posted["chatId"]
    before = client.get_json(f"/api/v1/chats/{cid}")
    resp = _rename(client, cid, "  Write-ahead logs, explained \t")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body == {**{k: before[k] for k in ("id", "createdAt", "updatedAt")},
                    "title": "Write-ahead logs, explained"}  # fmt: skip
    after = client.get_json(f"/api/v1/chats/{cid}")
    assert after["title"] == "Write-ahead logs, explained"
    assert after["updatedAt"] == before["updatedAt"]  # a rename is not activity
    assert after["messages"] == before["messages"]
    listed = client.get_json("/api/v1/chats")["chats"]
    assert [(c["id"], c["title"]) for c in listed] == [(cid, "Write-ahead logs, explained")]
    longest = "é" * 200
    assert _rename(client, cid, f" {longest} ").json()["title"] == longest
    assert _rename(client, cid, "Ünïcödé 🚀 ok").json()["title"] == "Ünïcödé 🚀 ok"


@pytest.mark.parametrize(
    "title",
    [None, 7, ["x"], "", "   ", "\t\n", "x" * 201, "bell\x07", "two\nlines", "tab\tinside",
     "nul\x00", "del\x7f", "c1\x85x", "sep\u2028x", "\ud800"],
)  # fmt: skip
def test_a_title_that_is_not_one_line_of_1_to_200_characters_is_422(
    client: Client, title: Any
) -> None:
    posted = client.post_chat(f"Keep my title {SHORT}")
    resp = _rename(client, posted["chatId"], title)
    _error(resp, 422, "invalid_title")
    assert client.get_json(f"/api/v1/chats/{posted['chatId']}")["title"].startswith("Keep my")


def test_rename_without_a_title_or_a_json_object(client: Client) -> None:
    cid = client.post_chat(f"Body checks {SHORT}")["chatId"]
    _error(client.request("PATCH", f"/api/v1/chats/{cid}", json={}), 422, "invalid_title")
    resp = client.request("PATCH", f"/api/v1/chats/{cid}", data="[1]")
    _error(resp, 400, "invalid_json")
    resp = client.request("PATCH", f"/api/v1/chats/{cid}", data="not json")
    _error(resp, 400, "invalid_json")


def test_another_users_chat_cannot_be_renamed_and_writes_are_origin_checked(
    client: Client, stack: Stack
) -> None:
    cid = client.post_chat(f"Mine {SHORT}")["chatId"]
    other = stack.client()
    _error(_rename(other, cid, "Theirs now"), 404, "chat_not_found")
    _error(_rename(client, str(uuid.uuid4()), "Nobody's"), 404, "chat_not_found")
    evil = _rename(client, cid, "Cross-site", headers={"Origin": "http://evil.example"})
    _error(evil, 403, "forbidden_origin")
    sibling = _rename(client, cid, "Sibling", headers={"Sec-Fetch-Site": "same-site"})
    _error(sibling, 403, "forbidden_origin")
    own = _rename(client, cid, "Same origin", headers={"Origin": client.base_url})
    assert own.status_code == 200, own.text
    assert client.get_json(f"/api/v1/chats/{cid}")["title"] == "Same origin"


# -- search -----------------------------------------------------------------------------------


def _titled(client: Client, *titles: str) -> dict[str, str]:
    ids = {}
    for title in titles:
        cid = client.post_chat(f"{title} {SHORT}")["chatId"]
        assert _rename(client, cid, title).status_code == 200
        ids[title] = cid
    return ids


def _search(client: Client, query: str, **params: str) -> list[str]:
    resp = client.request("GET", "/api/v1/chats", params={"q": query, **params})
    assert resp.status_code == 200, resp.text
    return [c["title"] for c in resp.json()["chats"]]


def test_search_matches_a_substring_of_the_title_ignoring_case(client: Client) -> None:
    _titled(client, "Mixed CASE title", "50% off", "50 percent", "snake_case", "snakeXcase",
            "back\\slash", "Nothing here")  # fmt: skip
    assert _search(client, "case") == ["snakeXcase", "snake_case", "Mixed CASE title"]
    assert _search(client, "mIxEd cAsE") == ["Mixed CASE title"]
    # LIKE's wildcards and its escape character match only themselves.
    assert _search(client, "%") == ["50% off"]
    assert _search(client, "50%") == ["50% off"]
    assert _search(client, "_") == ["snake_case"]
    assert _search(client, "e_c") == ["snake_case"]
    assert _search(client, "\\") == ["back\\slash"]
    assert _search(client, "nope") == []
    # Newest first and ?limit=, as the list without q.
    assert _search(client, "a", limit="2") == ["back\\slash", "snakeXcase"]
    everything = client.get_json("/api/v1/chats")["chats"]
    assert len(_search(client, "   ")) == len(everything) == 7  # blank: no filter


def test_search_sees_only_the_callers_chats_and_refuses_odd_queries(
    client: Client, stack: Stack
) -> None:
    _titled(client, "Shared word")
    other = stack.client()
    _titled(other, "Shared word too")
    assert _search(client, "shared") == ["Shared word"]
    assert _search(other, "shared") == ["Shared word too"]
    _error(client.request("GET", "/api/v1/chats", params={"q": "x" * 201}), 400, "bad_request")
    _error(client.request("GET", "/api/v1/chats?q=a%00b"), 400, "bad_request")
    assert _search(client, "x" * 200) == []


# -- regenerate -------------------------------------------------------------------------------


def _regenerate(client: Client, chat_id: str, **kw: Any) -> Any:
    return client.request("POST", f"/api/v1/chats/{chat_id}/regenerate", **kw)


def test_regenerate_replaces_the_last_answer(client: Client, stack: Stack) -> None:
    first = _done_chat(client, f"First question {SHORT}")
    cid = first["chatId"]
    second = client.post_chat(f"Second question {SHORT}", chat_id=cid)
    client.attach(second["streamId"])
    before = client.get_json(f"/api/v1/chats/{cid}")
    assert _keys(stack, second["streamId"]) == 2  # its log and its state
    resp = _regenerate(client, cid)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    sid = body["streamId"]
    assert body == {
        "chatId": cid,
        "messageId": body["messageId"],
        "userMessageId": second["userMessageId"],
        "streamId": sid,
        "ws": f"/api/v1/streams/{sid}/ws",
        "events": f"/api/v1/streams/{sid}/events",
    }
    assert body["messageId"] != second["messageId"] and sid != second["streamId"]
    seen = client.attach(sid)
    assert seen.last["type"] == "done"
    after = client.get_json(f"/api/v1/chats/{cid}")
    # The same turns; the last answer is a new message with a new stream, in the old one's place.
    assert [m["id"] for m in after["messages"]] == [
        *(m["id"] for m in before["messages"][:3]),
        body["messageId"],
    ]
    assert after["messages"][:3] == before["messages"][:3]
    new = after["messages"][3]
    assert (new["role"], new["status"], new["streamId"]) == ("assistant", "complete", sid)
    assert new["content"] == seen.text and new["model"] == "demo"
    assert after["updatedAt"] > before["updatedAt"]
    # The old answer is gone everywhere: its stream, its log and state in Redis.
    _error(client.request("GET", f"/api/v1/streams/{second['streamId']}"), 404, "stream_not_found")
    assert _keys(stack, second["streamId"]) == 0
    # Regenerating again replaces the new one in turn.
    again = _regenerate(client, cid, json={})
    assert again.status_code == 202, again.text
    client.attach(again.json()["streamId"])
    messages = client.get_json(f"/api/v1/chats/{cid}")["messages"]
    assert [m["id"] for m in messages][3] == again.json()["messageId"] and len(messages) == 4


def test_a_queued_or_running_answer_cannot_be_regenerated_until_it_ends(client: Client) -> None:
    posted = client.post_chat("Long one [demo:words=2000] [demo:rate=50]")
    cid, sid = posted["chatId"], posted["streamId"]
    _error(_regenerate(client, cid), 409, "illegal_transition")
    assert client.get_json(f"/api/v1/chats/{cid}")["messages"][1]["id"] == posted["messageId"]
    client.attach(sid, until=lambda a: len(a.events) >= 3)
    _error(_regenerate(client, cid), 409, "illegal_transition")
    assert client.request("POST", f"/api/v1/streams/{sid}/cancel").status_code == 202
    client.wait_status(sid, {"cancelled"})
    resp = _regenerate(client, cid)  # a cancelled answer may be regenerated
    assert resp.status_code == 202, resp.text
    new = resp.json()["streamId"]
    assert client.request("POST", f"/api/v1/streams/{new}/cancel").status_code == 202
    client.wait_status(new, {"cancelled"})
    assert client.answer(cid)["id"] == resp.json()["messageId"]


def test_a_failed_answer_is_regenerated(client: Client) -> None:
    posted = client.post_chat("Break [demo:words=50] [demo:fail-after=3]")
    assert client.attach(posted["streamId"]).last["type"] == "error"
    resp = _regenerate(client, posted["chatId"])
    assert resp.status_code == 202, resp.text
    # The same message again: the demo fails the same way, on a new stream.
    assert client.attach(resp.json()["streamId"]).last["type"] == "error"
    answer = client.answer(posted["chatId"])
    assert (answer["id"], answer["status"]) == (resp.json()["messageId"], "failed")


def test_regenerate_of_another_users_chat_is_404_and_a_bad_body_400(
    client: Client, stack: Stack
) -> None:
    cid = _done_chat(client)["chatId"]
    other = stack.client()
    _error(_regenerate(other, cid), 404, "chat_not_found")
    _error(_regenerate(client, str(uuid.uuid4())), 404, "chat_not_found")
    _error(_regenerate(client, cid, json={"model": "no-such-model"}), 400, "model_not_allowed")
    _error(_regenerate(client, cid, data="[]"), 400, "invalid_json")
    evil = _regenerate(client, cid, headers={"Origin": "http://evil.example"})
    _error(evil, 403, "forbidden_origin")
    assert client.answer(cid)["status"] == "complete"  # none of these touched it


def test_regenerate_with_an_idempotency_key_is_answered_once(client: Client) -> None:
    cid = _done_chat(client)["chatId"]
    key = {"Idempotency-Key": str(uuid.uuid4())}
    first = _regenerate(client, cid, headers=key)
    assert first.status_code == 202, first.text
    client.attach(first.json()["streamId"])
    replay = _regenerate(client, cid, headers=key)
    assert replay.status_code == 202 and replay.json() == first.json()
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert client.answer(cid)["id"] == first.json()["messageId"]  # nothing new started
    _error(_regenerate(client, cid, headers=key, json={"model": "demo"}), 422,
           "idempotency_key_reused")  # fmt: skip


def test_a_chat_without_an_answer_has_nothing_to_regenerate(db: Session) -> None:
    chat = guest_chat(db, "empty")
    db.commit()
    with pytest.raises(IllegalTransition, match="no answer"):
        check_regenerable(db, chat)


# -- models -----------------------------------------------------------------------------------


def test_models_lists_the_default_and_the_allowed_ones(client: Client, stack: Stack) -> None:
    assert client.get_json("/api/v1/models") == {"default": "demo", "models": ["demo"]}
    _proc, port = stack.start_web_with(RELAY_ALLOWED_MODELS="other,demo,big")
    many = stack.client(f"http://127.0.0.1:{port}")
    assert many.get_json("/api/v1/models") == {
        "default": "demo",
        "models": ["demo", "other", "big"],
    }
    # A regenerated answer asks the replaced answer's model, unless the request names one.
    posted = many.post_chat(f"Which model {SHORT}", model="big")
    many.attach(posted["streamId"])
    kept = _regenerate(many, posted["chatId"])
    assert kept.status_code == 202, kept.text
    many.attach(kept.json()["streamId"])
    assert many.answer(posted["chatId"])["model"] == "big"
    chosen = _regenerate(many, posted["chatId"], json={"model": "other"})
    assert chosen.status_code == 202, chosen.text
    many.attach(chosen.json()["streamId"])
    assert many.answer(posted["chatId"])["model"] == "other"
    bad = Client(stack.base_url)
    bad.http.headers["Authorization"] = "Bearer rly_not_a_token"
    _error(bad.request("GET", "/api/v1/models"), 401, "unauthorized")
