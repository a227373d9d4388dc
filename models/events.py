"""The wire protocol's events: what the log stores and what clients receive."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

CHUNK = "chunk"
# Wire only (the batch form): consecutive chunk events in one message, never stored.
CHUNKS = "chunks"
DONE = "done"
CANCELLED = "cancelled"
ERROR = "error"
# A cancelled event's reason when the detach policy ended it (nobody watched for too long).
ABANDONED = "abandoned"
# Written by an admin retry after a terminal event: the answer continues after it.
RESUMED = "resumed"
TERMINAL_TYPES = frozenset({DONE, CANCELLED, ERROR})
# The stream status each terminal event leaves behind.
STATUS_FOR_TERMINAL = {DONE: "done", CANCELLED: "cancelled", ERROR: "failed"}
TERMINAL_FOR_STATUS = {v: k for k, v in STATUS_FOR_TERMINAL.items()}


@dataclass(frozen=True)
class Event:
    """One entry of a stream's log; ``seq`` runs 1, 2, 3, ... without holes."""

    seq: int
    type: str
    text: str = ""
    message_id: str = ""
    error: dict[str, str] = field(default_factory=dict)
    attempt: int = 0
    reason: str = ""  # cancelled: why, when not at a person's request ("abandoned")

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "seq": self.seq}
        if self.type == CHUNK:
            out["text"] = self.text
        elif self.type == DONE:
            out["messageId"] = self.message_id
        elif self.type == ERROR:
            out["error"] = self.error
        elif self.type == RESUMED:
            out["attempt"] = self.attempt
        elif self.type == CANCELLED and self.reason:
            out["reason"] = self.reason
        return out

    @functools.cached_property
    def json(self) -> str:
        """The wire form, built once: the hub hands one Event to every viewer."""
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)

    def to_json(self) -> str:
        return self.json

    def to_sse(self) -> str:
        return f"id: {self.seq}\nevent: {self.type}\ndata: {self.to_json()}\n\n"

    def payload(self) -> str:
        """The ``d`` field stored in the Redis entry."""
        if self.type == CHUNK:
            return self.text
        if self.type == DONE:
            return self.message_id
        if self.type == ERROR:
            return json.dumps(self.error, separators=(",", ":"))
        if self.type == RESUMED:
            return str(self.attempt)
        if self.type == CANCELLED:
            return self.reason
        return ""

    @classmethod
    def from_entry(cls, entry_id: str, fields: dict[str, str]) -> Event:
        seq = int(entry_id.rsplit("-", 1)[1])
        return cls.decode(seq, fields.get("t", CHUNK), fields.get("d", ""))

    @classmethod
    def decode(cls, seq: int, kind: str, data: str) -> Event:
        """The event stored as type ``kind`` with field ``d`` = ``data``."""
        if kind == CHUNK:
            return cls(seq, kind, text=data)
        if kind == DONE:
            return cls(seq, kind, message_id=data)
        if kind == ERROR:
            return cls(seq, kind, error=json.loads(data) if data else {})
        if kind == RESUMED:
            return cls(seq, kind, attempt=int(data or 0))
        if kind == CANCELLED:
            return cls(seq, kind, reason=data)
        return cls(seq, kind)


def error_event(seq: int, code: str, message: str) -> Event:
    return Event(seq, ERROR, error={"code": code, "message": message})


@dataclass(frozen=True)
class Message:
    """One wire message: a single event, or (batch form) a run of chunks.

    ``first``..``last`` are the seqs it carries; ``json`` is its text.
    """

    first: int
    last: int
    type: str
    json: str

    def to_sse(self) -> str:
        return f"id: {self.last}\nevent: {self.type}\ndata: {self.json}\n\n"


def single_messages(events: Sequence[Event]) -> list[Message]:
    """One message per event (the default form)."""
    return [Message(e.seq, e.seq, e.type, e.json) for e in events]


def batch_messages(events: Sequence[Event]) -> list[Message]:
    """The batch form: each run of two or more consecutive chunks becomes one ``chunks``
    message; a lone chunk and every other event travel as themselves."""
    out: list[Message] = []
    run: list[Event] = []
    for event in events:
        if event.type == CHUNK and (not run or event.seq == run[-1].seq + 1):
            run.append(event)
            continue
        _flush_run(run, out)
        run = [event] if event.type == CHUNK else []
        if event.type != CHUNK:
            out.append(Message(event.seq, event.seq, event.type, event.json))
    _flush_run(run, out)
    return out


def _flush_run(run: list[Event], out: list[Message]) -> None:
    if len(run) == 1:
        out.append(Message(run[0].seq, run[0].seq, CHUNK, run[0].json))
    elif run:
        payload = {"type": CHUNKS, "seq": run[0].seq, "texts": [e.text for e in run]}
        text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
        out.append(Message(run[0].seq, run[-1].seq, CHUNKS, text))
