"""Deleting a chat (HTTP) and a user (admin CLI): SQL rows and Redis logs go, a running
answer stops, viewers are told, other users' chats are untouched."""

from __future__ import annotations

import contextlib
import subprocess
import time

from sqlalchemy import create_engine, func, select
from websockets.exceptions import ConnectionClosed

from models import keys
from models.db import normalize_url
from models.tables import Chat, Message, Stream, User
from tests.client import Client, wait_for
from tests.conftest import Stack
from tests.procs import BIN, ROOT


def _keys(stack: Stack, stream_id: str) -> int:
    r = stack.redis()
    return int(r.exists(f"relay:{{{stream_id}}}:log", f"relay:{{{stream_id}}}:state"))


def test_deleting_a_chat_stops_its_answer_and_removes_everything(stack: Stack) -> None:
    client = stack.client()
    posted = client.post_chat("Delete me while I talk [demo:words=600]")
    sid, chat_id = posted["streamId"], posted["chatId"]
    with client.connect_ws(f"/api/v1/streams/{sid}/ws") as ws:
        for _ in range(5):
            ws.recv()
        resp = client.request("DELETE", f"/api/v1/chats/{chat_id}")
        assert resp.status_code == 204, resp.text
        with contextlib.suppress(ConnectionClosed):  # the viewer is told, never left hanging
            for _ in ws:
                pass
        assert ws.close_code == 4404  # "stream ... disappeared"
    assert client.request("GET", f"/api/v1/chats/{chat_id}").status_code == 404
    assert client.request("GET", f"/api/v1/streams/{sid}").status_code == 404
    assert _keys(stack, sid) == 0
    time.sleep(1.0)  # the worker was writing: it is fenced off and writes nothing more
    assert _keys(stack, sid) == 0
    assert chat_id not in {c["id"] for c in client.get_json("/api/v1/chats")["chats"]}
    again = client.request("DELETE", f"/api/v1/chats/{chat_id}")
    assert again.status_code == 404 and again.json()["error"]["code"] == "chat_not_found"


def test_another_users_chat_cannot_be_deleted(stack: Stack) -> None:
    owner, other = stack.client(), stack.client()
    posted = owner.post_chat("Mine [demo:words=5]")
    owner.attach(posted["streamId"])
    resp = other.request("DELETE", f"/api/v1/chats/{posted['chatId']}")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "chat_not_found"
    assert owner.get_json(f"/api/v1/chats/{posted['chatId']}")["id"] == posted["chatId"]


def test_the_admin_deletes_a_user_and_everything_of_theirs(stack: Stack) -> None:
    client = stack.client()
    first = client.post_chat("One [demo:words=5]")
    client.attach(first["streamId"])
    running = client.post_chat("Two [demo:words=600]")
    client.attach(running["streamId"], until=lambda a: len(a.events) >= 3)
    bystander = stack.client()
    kept = bystander.post_chat("Not theirs [demo:words=5]")
    engine = create_engine(normalize_url(stack.env["DATABASE_URL"]))
    try:
        with engine.connect() as conn:
            uid = conn.scalar(select(Chat.user_id).where(Chat.id == first["chatId"]))
        assert stack.redis().exists(keys.feed_key(str(uid))) == 1  # their live feed
        done = subprocess.run(
            [str(BIN / "celery"), "-A", "workers", "streams", "delete-user", str(uid)],
            env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "deleted, with 2 chat(s)" in done.stdout
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(User).where(User.id == uid)) == 0
            chats = select(func.count()).select_from(Chat).where(Chat.user_id == uid)
            assert conn.scalar(chats) == 0
            for chat in (first["chatId"], running["chatId"]):
                for model in (Message, Stream):
                    count = select(func.count()).select_from(model).where(model.chat_id == chat)
                    assert conn.scalar(count) == 0
    finally:
        engine.dispose()
    assert _keys(stack, first["streamId"]) == 0 and _keys(stack, running["streamId"]) == 0
    assert stack.redis().exists(keys.feed_key(str(uid))) == 0
    wait_for(lambda: bystander.stream(kept["streamId"])["status"] == "done", timeout=30)
    missing = subprocess.run(
        [str(BIN / "celery"), "-A", "workers", "streams", "delete-user", "no-such-user"],
        env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 1 and "no user" in missing.stderr


def test_deleting_a_chat_is_refused_cross_site(client: Client) -> None:
    posted = client.post_chat("Keep me [demo:words=5]")
    resp = client.request(
        "DELETE", f"/api/v1/chats/{posted['chatId']}", headers={"Origin": "https://evil.example"}
    )
    assert resp.status_code == 403
