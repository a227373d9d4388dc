"""Runs of consecutive events and their wire encodings, built once per process and shared
by every viewer that sends them (one JSON text, one WebSocket frame, one deflate).

A ``Batch`` keeps its events as columns (types and data, as the log stores them), so a
catch-up read or a live message becomes a batch, and a run of chunks becomes one ``chunks``
message, without a Python object per event.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from models.events import (
    CHUNK,
    CHUNKS,
    TERMINAL_TYPES,
    Event,
    Message,
    batch_messages,
    single_messages,
)

_TEXT = 0x81  # FIN + text opcode
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_RSV1 = 0x40  # permessage-deflate: this message is compressed


@dataclass(frozen=True)
class Deflate:
    """How one connection compresses: permessage-deflate was negotiated with
    ``server_no_context_takeover``, so a message compresses the same way on every connection
    and its compressed frame can be shared. Messages under ``min_bytes`` go uncompressed."""

    window_bits: int = 15
    min_bytes: int = 1024
    level: int = 1
    # What a batch files this connection's frames under: a str hashes once and for all,
    # where the dataclass's generated __hash__ ran for every viewer of every batch.
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", f"{self.window_bits}/{self.min_bytes}/{self.level}")

    def compress(self, payload: bytes) -> bytes:
        compressor = zlib.compressobj(self.level, zlib.DEFLATED, -self.window_bits)
        data = compressor.compress(payload) + compressor.flush(zlib.Z_SYNC_FLUSH)
        return data[:-4]  # RFC 7692 7.2.1: drop the 00 00 ff ff tail


def ws_frame(payload: bytes, compressed: bool = False) -> bytes:
    """One unmasked, unfragmented server-to-client text frame."""
    first = _TEXT | (_RSV1 if compressed else 0)
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", first, size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", first, 126, size)
    else:
        header = struct.pack("!BBQ", first, 127, size)
    return header + payload


def encode_ws(message: Message, deflate: Deflate | None) -> bytes:
    payload = message.json.encode()
    if deflate is not None and len(payload) >= deflate.min_bytes:
        return ws_frame(deflate.compress(payload), compressed=True)
    return ws_frame(payload)


class Batch:
    """Consecutive events of one stream: seq ``first`` + i has type ``types[i]`` and stored
    data ``datas[i]`` (a chunk's text, a done event's message ID, ...)."""

    __slots__ = ("_events", "_messages", "_sse", "_ws", "datas", "first", "types")

    def __init__(self, first: int, types: list[str], datas: list[str]) -> None:
        self.first = first
        self.types = types
        self.datas = datas
        self._events: list[Event] | None = None
        self._messages: dict[bool, list[Message]] = {}
        self._ws: dict[tuple[bool, str | None], bytes] = {}
        self._sse: dict[bool, str] = {}

    @classmethod
    def of(cls, events: Sequence[Event]) -> Batch:
        return cls(events[0].seq, [e.type for e in events], [e.payload() for e in events])

    @property
    def last(self) -> int:
        return self.first + len(self.types) - 1

    @property
    def events(self) -> list[Event]:
        if self._events is None:
            self._events = [
                Event.decode(self.first + i, kind, data)
                for i, (kind, data) in enumerate(zip(self.types, self.datas, strict=True))
            ]
        return self._events

    def __len__(self) -> int:
        return len(self.types)

    def since(self, cursor: int) -> Batch | None:
        """The events after ``cursor`` (this batch itself when it has no older ones)."""
        if cursor < self.first:
            return self
        if cursor >= self.last:
            return None
        cut = cursor - self.first + 1
        return Batch(cursor + 1, self.types[cut:], self.datas[cut:])

    def upto(self, seq: int) -> Batch:
        """The events up to ``seq`` included."""
        if seq >= self.last:
            return self
        keep = seq - self.first + 1
        return Batch(self.first, self.types[:keep], self.datas[:keep])

    def first_terminal(self) -> int | None:
        """The seq of the first terminal event, if any."""
        if self.types.count(CHUNK) == len(self.types):
            return None
        for i, kind in enumerate(self.types):
            if kind in TERMINAL_TYPES:
                return self.first + i
        return None

    def messages(self, batched: bool) -> list[Message]:
        out = self._messages.get(batched)
        if out is None:
            out = self._encode(batched)
            self._messages[batched] = out
        return out

    def _encode(self, batched: bool) -> list[Message]:
        """The wire messages; runs of chunks (the common case) without an Event each."""
        if self.types.count(CHUNK) != len(self.types):
            return batch_messages(self.events) if batched else single_messages(self.events)
        if batched and len(self.types) > 1:
            payload = {"type": CHUNKS, "seq": self.first, "texts": self.datas}
            return [Message(self.first, self.last, CHUNKS, _dumps(payload))]
        return [
            Message(seq, seq, CHUNK, f'{{"type":"chunk","seq":{seq},"text":{_dumps(text)}}}')
            for seq, text in enumerate(self.datas, start=self.first)
        ]

    def ws_bytes(self, batched: bool, deflate: Deflate | None) -> bytes:
        """Every message of the batch as WebSocket frames, ready for one ``sendall``."""
        key = (batched, None if deflate is None else deflate.key)
        out = self._ws.get(key)
        if out is None:
            out = b"".join(encode_ws(m, deflate) for m in self.messages(batched))
            self._ws[key] = out
        return out

    def sse_text(self, batched: bool) -> str:
        out = self._sse.get(batched)
        if out is None:
            out = "".join(m.to_sse() for m in self.messages(batched))
            self._sse[batched] = out
        return out

    def nbytes(self) -> int:
        """Roughly what the batch holds, encodings included (for cache budgets)."""
        return 3 * sum(len(d) + 16 for d in self.datas)


class Notice:
    """A message about a stream that is no event of its log (no seq, never replayed): where
    a queued answer stands in line, ``{"type": "queued", "position": 2, "etaSeconds": 30}``.
    ``at``: the log's last seq when it was true; a viewer already past it drops it."""

    __slots__ = ("at", "text")

    def __init__(self, at: int, text: str) -> None:
        self.at = at
        self.text = text

    def ws_bytes(self, batched: bool, deflate: Deflate | None) -> bytes:
        return ws_frame(self.text.encode())  # a few dozen bytes: never worth compressing

    def sse_text(self, batched: bool) -> str:
        return f"event: queued\ndata: {self.text}\n\n"  # no id: Last-Event-ID stays put

    @property
    def fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = json.loads(self.text)
        return fields
