"""The wire protocol's events: what the log stores and what clients receive."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

CHUNK = "chunk"
DONE = "done"
CANCELLED = "cancelled"
ERROR = "error"
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
        return ""

    @classmethod
    def from_entry(cls, entry_id: str, fields: dict[str, str]) -> Event:
        seq = int(entry_id.rsplit("-", 1)[1])
        kind = fields.get("t", CHUNK)
        data = fields.get("d", "")
        if kind == CHUNK:
            return cls(seq, kind, text=data)
        if kind == DONE:
            return cls(seq, kind, message_id=data)
        if kind == ERROR:
            return cls(seq, kind, error=json.loads(data) if data else {})
        if kind == RESUMED:
            return cls(seq, kind, attempt=int(data or 0))
        return cls(seq, kind)


def error_event(seq: int, code: str, message: str) -> Event:
    return Event(seq, ERROR, error={"code": code, "message": message})
