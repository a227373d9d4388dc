"""Completion webhooks against the real stack and a real HTTP receiver on loopback: an
answer that ends while nobody watches is delivered once per end, signed (Standard
Webhooks), retried with backoff while the receiver fails, never for an answer someone
watched to its end, and still once when the web process its viewer used is killed."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from standardwebhooks import Webhook

from ops.redis_server import EmbeddedRedis
from tests.client import Client, wait_for
from tests.conftest import Stack, own_stack

SECRET = "whsec_" + base64.b64encode(b"relay-test-webhook-secret-32byte").decode()


@dataclass
class Receiver:
    """A webhook endpoint: records every request; fails the first ``fail_first`` tries of
    each delivery id with ``fail_status``."""

    fail_first: int = 0
    fail_status: int = 503
    requests: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        with self.lock:
            delivery = headers.get("webhook-id", "")
            tries = sum(1 for r in self.requests if r["id"] == delivery)
            status = self.fail_status if tries < self.fail_first else 200
            self.requests.append(
                {"id": delivery, "headers": headers, "body": body, "status": status}
            )
        return status

    def accepted(self, stream_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [
                r
                for r in self.requests
                if r["status"] == 200 and r["id"].startswith(stream_id + ".")
            ]

    def tries(self, stream_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if r["id"].startswith(stream_id + ".")]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    got = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            status = got.handle({k.lower(): v for k, v in self.headers.items()}, body)
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    got.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/relay"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield got
    server.shutdown()
    server.server_close()


@pytest.fixture
def hooked(receiver: Receiver, redis_server: EmbeddedRedis, tmp_path: Path) -> Iterator[Stack]:
    """A stack of its own whose webhooks go to ``receiver``, with one worker."""
    settings = {"RELAY_WEBHOOK_URL": receiver.url, "RELAY_WEBHOOK_SECRET": SECRET}
    with own_stack(redis_server, tmp_path, settings) as stack:
        stack.start_worker("w1")
        yield stack


def verified(request: dict[str, Any]) -> dict[str, Any]:
    """The body, after checking its signature the way a receiver would."""
    body: dict[str, Any] = Webhook(SECRET).verify(request["body"], request["headers"])
    return body


def quiet_for(seconds: float) -> None:
    """Let several sweeps (every 0.5 s in the test stack) and backoffs pass."""
    time.sleep(seconds)


def test_an_unwatched_answer_is_delivered_once_signed_after_the_receiver_recovers(
    hooked: Stack, receiver: Receiver
) -> None:
    receiver.fail_first = 2  # 503 twice: tried again after about 1 s, then 2 s
    client = hooked.client()
    posted = client.post_chat("Tell me later [demo:words=20]")
    sid = posted["streamId"]
    accepted = wait_for(lambda: receiver.accepted(sid), timeout=60)
    tries = receiver.tries(sid)
    assert [t["status"] for t in tries] == [503, 503, 200]
    assert len({t["id"] for t in tries}) == 1  # one delivery id for every try of the end
    body = verified(accepted[0])
    answer = client.answer(posted["chatId"])
    assert body["type"] == "answer.finished"
    data = body["data"]
    assert data["streamId"] == sid and data["chatId"] == posted["chatId"]
    assert data["messageId"] == posted["messageId"]
    assert (data["status"], data["endReason"], data["error"]) == ("done", None, None)
    assert data["preview"] == answer["content"][:280] and data["chars"] == len(answer["content"])
    assert accepted[0]["id"] == f"{sid}.{client.stream(sid)['lastSeq']}"
    # A forged or altered body does not verify.
    forged = {**accepted[0], "body": accepted[0]["body"].replace(b"done", b"fail")}
    with pytest.raises(Exception, match="signature"):
        verified(forged)
    quiet_for(3)
    assert len(receiver.tries(sid)) == 3  # nothing more once it was taken


def test_an_answer_watched_to_its_end_is_not_delivered(hooked: Stack, receiver: Receiver) -> None:
    client = hooked.client()
    posted = client.post_chat("I am here [demo:words=30] [demo:rate=30]")
    watched = client.attach(posted["streamId"], timeout=60)
    assert watched.last["type"] == "done"
    other = client.post_chat("Nobody here [demo:words=5]", chat_id=posted["chatId"])
    wait_for(lambda: receiver.accepted(other["streamId"]), timeout=60)
    quiet_for(2)  # the watched one was decided in the same sweeps, or before
    assert receiver.tries(posted["streamId"]) == []


def test_a_refused_delivery_is_not_tried_again(hooked: Stack, receiver: Receiver) -> None:
    receiver.fail_first, receiver.fail_status = 100, 400
    client = hooked.client()
    sid = client.post_chat("Refused [demo:words=5]")["streamId"]
    wait_for(lambda: receiver.tries(sid), timeout=60)
    quiet_for(3)
    assert [t["status"] for t in receiver.tries(sid)] == [400]


def test_an_answer_whose_viewer_lost_its_web_process_is_delivered_once(
    hooked: Stack, receiver: Receiver
) -> None:
    """The viewer watched through a second web process that is SIGKILLed mid-answer (its
    presence lease is short: it checks every second). The answer ends unwatched, under a
    cancel-after policy too: delivered once, cancelled as abandoned."""
    owner = hooked.client()
    web, port = hooked.start_web_with(RELAY_HUB_CHECK_S="1")
    other = Client(f"http://127.0.0.1:{port}")
    other.http = owner.http  # the same user, through the other process
    posted = owner.post_chat(
        "Watch me [demo:words=300] [demo:rate=20]",
        onDetach={"policy": "cancel-after", "seconds": 2},
    )
    sid = posted["streamId"]
    with contextlib.ExitStack() as sockets:
        ws = sockets.enter_context(other.connect_ws(f"/api/v1/streams/{sid}/ws"))
        first = json.loads(ws.recv(timeout=30))
        assert first["seq"] == 1
        web.kill()
    accepted = wait_for(lambda: receiver.accepted(sid), timeout=60)
    data = verified(accepted[0])["data"]
    assert (data["status"], data["endReason"]) == ("cancelled", "abandoned")
    assert owner.stream(sid)["status"] == "cancelled"
    quiet_for(3)
    assert len(receiver.tries(sid)) == 1


def test_a_retried_answer_is_delivered_again_for_its_new_end(
    hooked: Stack, receiver: Receiver
) -> None:
    client = hooked.client()
    posted = client.post_chat("Twice [demo:words=20] [demo:fail-after=5]")
    sid = posted["streamId"]
    first = wait_for(lambda: receiver.accepted(sid), timeout=60)
    assert verified(first[0])["data"]["status"] == "failed"
    assert verified(first[0])["data"]["error"]["code"] == "generation_failed"
    resp = client.request("POST", f"/api/v1/streams/{sid}/retry")
    assert resp.status_code == 202, resp.text
    both = wait_for(lambda: receiver.accepted(sid) if len(receiver.accepted(sid)) > 1 else None)
    assert len({r["id"] for r in both}) == 2  # a new end, a new delivery id
    quiet_for(2)
    assert len(receiver.accepted(sid)) == 2
