"""examples/python-client/relay_client.py against a real stack: the answer in one request,
exact; the web process serving it SIGKILLed mid-answer and restarted, and the example's
retries (same Idempotency-Key, Last-Event-ID) still get exactly the answer, started once;
its command line."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.conftest import ON_SQLITE, Stack
from tests.procs import BIN, ROOT

pytestmark = ON_SQLITE

EXAMPLE = ROOT / "examples" / "python-client" / "relay_client.py"
LONG = "[demo:words=400]"


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("relay_client", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["relay_client"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _stored(http: httpx.Client, chat_id: str) -> dict[str, Any]:
    messages = http.get(f"/api/v1/chats/{chat_id}").json()["messages"]
    answer: dict[str, Any] = messages[-1]
    assert answer["role"] == "assistant"
    return answer


def test_an_answer_in_one_request(stack: Stack, example: ModuleType) -> None:
    pieces: list[str] = []
    with httpx.Client(base_url=stack.base_url) as http:
        answer = example.ask(http, "Hello [demo:words=30]", on_text=pieces.append)
        assert answer.retries == 0 and answer.end["type"] == "done"
        assert [e["seq"] for e in answer.events] == list(range(1, len(answer.events) + 1))
        assert "".join(pieces) == answer.text == _stored(http, answer.turn["chatId"])["content"]
        more = example.ask(http, "And more [demo:words=5]", chat_id=answer.turn["chatId"])
        assert more.turn["chatId"] == answer.turn["chatId"] and more.end["type"] == "done"
        with pytest.raises(example.Refused) as refused:
            example.ask(http, "   ")
        assert refused.value.status == 400 and refused.value.error["code"] == "invalid_message"


def test_a_web_crash_mid_answer_is_resumed(stack: Stack, example: ModuleType) -> None:
    web, port = stack.start_web()
    got: dict[str, Any] = {}
    ten = threading.Event()
    pieces: list[str] = []

    def on_text(text: str) -> None:
        pieces.append(text)
        if len(pieces) >= 10:
            ten.set()

    def run() -> None:
        try:
            got["answer"] = example.ask(http, f"Survive a crash {LONG}", on_text=on_text)
        except BaseException as exc:  # reported by the test below
            got["error"] = exc

    with httpx.Client(base_url=f"http://127.0.0.1:{port}") as http:
        reader = threading.Thread(target=run)
        reader.start()
        restarted = None
        try:
            assert ten.wait(30), got
            web.kill()  # SIGKILL, mid-answer, while the post's response is open
            restarted, _ = stack.start_web(port=port)
            reader.join(60)
            assert not reader.is_alive() and "error" not in got, got
        finally:
            web.kill()
            if restarted is not None:
                restarted.stop()
            reader.join(5)
        answer = got["answer"]
        assert answer.retries >= 1 and answer.end["type"] == "done"
        assert [e["seq"] for e in answer.events] == list(range(1, len(answer.events) + 1))
        other = httpx.Client(base_url=stack.base_url, cookies=http.cookies)
        with other:
            assert "".join(pieces) == answer.text
            assert answer.text == _stored(other, answer.turn["chatId"])["content"]
            assert len(other.get("/api/v1/chats").json()["chats"]) == 1  # started once


def test_the_command_line(stack: Stack) -> None:
    done = subprocess.run(
        [str(BIN / "python"), str(EXAMPLE), "--base", stack.base_url, "Hi [demo:words=12]"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() and "[done; chat " in done.stderr
