"""Ask relay a question and print the answer as it streams, in one request, resuming after
any drop: a lost network, a web process restarted or killed mid-answer, a 503 while Redis or
the database is away.

The post asks for its answer on its own response (``Accept: text/event-stream``, see
docs/api.md, "The answer on the post's own response") and carries an ``Idempotency-Key``. When
the response breaks off before the answer's terminal event, the same post is sent again with
the same key and ``Last-Event-ID`` (the last seq received): relay starts nothing new and
sends the rest, from the next seq. The text printed is the answer, exactly: no gap, no piece
twice.

    python examples/python-client/relay_client.py "Explain write-ahead logs"
    python examples/python-client/relay_client.py --base http://127.0.0.1:8000 \\
        --token "$TOKEN" --chat <chatId> "And in PostgreSQL?"

Needs httpx and httpx-sse (both in relay's own environment: ``.venv/bin/python``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from httpx_sse import SSEError, connect_sse

TERMINAL = {"done", "cancelled", "error"}
RETRIED_STATUSES = {502, 503, 504}  # a proxy or relay itself, briefly unavailable


@dataclass
class Answer:
    """What one question got: the turn's ids, the answer's events in seq order, its text."""

    turn: dict[str, Any] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    retries: int = 0  # posts sent again after a drop

    @property
    def last_seq(self) -> int:
        return int(self.events[-1]["seq"]) if self.events else 0

    @property
    def text(self) -> str:
        return "".join(e["text"] for e in self.events if e["type"] == "chunk")

    @property
    def end(self) -> dict[str, Any] | None:
        """The terminal event, once it came (an admin retry may send ``resumed`` after it)."""
        last = self.events[-1] if self.events else None
        return last if last is not None and last["type"] in TERMINAL else None


class Refused(Exception):
    """relay answered the post with an error (4xx): it is not worth sending again."""

    def __init__(self, status: int, error: dict[str, Any]) -> None:
        super().__init__(f"{status} {error.get('code')}: {error.get('message')}")
        self.status = status
        self.error = error


class Unavailable(Exception):
    """A 502/503/504 before the stream started: try again shortly."""


def ask(
    http: httpx.Client,
    message: str,
    *,
    chat_id: str | None = None,
    on_text: Callable[[str], None] = lambda text: None,
    max_retries: int = 30,
) -> Answer:
    """Post ``message`` and read its answer to the end, resuming after drops.

    ``http`` carries the base URL and the identity (a bearer token, or the guest cookie it
    keeps): a retry must come from the same user, as the key is the user's."""
    body: dict[str, Any] = {"message": message}
    if chat_id:
        body["chatId"] = chat_id
    key = str(uuid.uuid4())
    answer = Answer()
    while True:
        try:
            _read(http, body, key, answer, on_text)
        except (httpx.TransportError, SSEError, Unavailable) as exc:
            if answer.retries >= max_retries:
                raise
            delay = min(5.0, 0.2 * 2**answer.retries) * random.uniform(0.5, 1.0)
            print(f"\n[dropped ({exc}); resuming after seq {answer.last_seq}]", file=sys.stderr)
            answer.retries += 1
            time.sleep(delay)
            continue
        if answer.end is not None:
            return answer
        if answer.retries >= max_retries:  # ended early each time (a server going away)
            raise Unavailable("the answer's responses kept ending before its end")
        answer.retries += 1


def _read(
    http: httpx.Client,
    body: dict[str, Any],
    key: str,
    answer: Answer,
    on_text: Callable[[str], None],
) -> None:
    headers = {"Idempotency-Key": key}
    if answer.last_seq:
        headers["Last-Event-ID"] = str(answer.last_seq)
    # relay writes a keepalive comment every 10 s while a model thinks: a minute of silence
    # is a dead connection (a half-open TCP connection never reports its end).
    with connect_sse(http, "POST", "/api/v1/chat?batch=1", json=body, headers=headers,
                     timeout=httpx.Timeout(10.0, read=60.0)) as source:  # fmt: skip
        response = source.response
        if response.status_code in RETRIED_STATUSES:
            raise Unavailable(str(response.status_code))
        if response.status_code != 200:
            response.read()
            raise Refused(response.status_code, response.json().get("error", {}))
        for sse in source.iter_sse():
            if not sse.data:
                continue  # the body's first block: "retry: 1000"
            data = json.loads(sse.data)
            if sse.event == "turn":
                answer.turn = data
            elif sse.event != "queued":  # a queue notice has no seq: only a place in line
                _take(answer, data, on_text)


def _take(answer: Answer, message: dict[str, Any], on_text: Callable[[str], None]) -> None:
    """Add the message's events that come after what we have (``chunks`` is a run)."""
    if message["type"] == "chunks":
        events = [{"type": "chunk", "seq": message["seq"] + i, "text": text}
                  for i, text in enumerate(message["texts"])]  # fmt: skip
    else:
        events = [message]
    for event in events:
        if event["seq"] <= answer.last_seq:
            continue  # already have it
        if event["seq"] != answer.last_seq + 1:
            raise SSEError(f"seq {event['seq']} after {answer.last_seq}")  # resume from ours
        answer.events.append(event)
        if event["type"] == "chunk":
            on_text(event["text"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("message")
    parser.add_argument("--base", default="http://127.0.0.1:8000", help="relay's address")
    parser.add_argument("--token", help="a bearer token (flask --app web create-token NAME)")
    parser.add_argument("--chat", help="continue this chat")
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    with httpx.Client(base_url=args.base, headers=headers) as http:
        try:
            answer = ask(http, args.message, chat_id=args.chat,
                         on_text=lambda text: print(text, end="", flush=True))  # fmt: skip
        except Refused as exc:
            print(f"refused: {exc}", file=sys.stderr)
            return 1
    end = answer.end or {}
    print(f"\n[{end.get('type')}; chat {answer.turn.get('chatId')}]", file=sys.stderr)
    return 0 if end.get("type") == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
