"""Runs of consecutive events and their wire encodings, built once per process and shared
by every viewer that sends them (one JSON text, one WebSocket frame, one deflate)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from models.events import Event, Message, batch_messages, single_messages

_TEXT = 0x81  # FIN + text opcode
_RSV1 = 0x40  # permessage-deflate: this message is compressed


@dataclass(frozen=True)
class Deflate:
    """How one connection compresses: permessage-deflate was negotiated with
    ``server_no_context_takeover``, so a message compresses the same way on every connection
    and its compressed frame can be shared. Messages under ``min_bytes`` go uncompressed."""

    window_bits: int = 15
    min_bytes: int = 1024
    level: int = 1

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
    """Consecutive events of one stream (seq ``first``..``last``, no hole)."""

    __slots__ = ("_messages", "_sse", "_ws", "events")

    def __init__(self, events: Sequence[Event]) -> None:
        self.events = events
        self._messages: dict[bool, list[Message]] = {}
        self._ws: dict[tuple[bool, Deflate | None], bytes] = {}
        self._sse: dict[bool, str] = {}

    @property
    def first(self) -> int:
        return self.events[0].seq

    @property
    def last(self) -> int:
        return self.events[-1].seq

    def __len__(self) -> int:
        return len(self.events)

    def since(self, cursor: int) -> Batch | None:
        """The events after ``cursor`` (this batch itself when it has no older ones)."""
        if cursor < self.first:
            return self
        if cursor >= self.last:
            return None
        return Batch(self.events[cursor - self.first + 1 :])

    def messages(self, batched: bool) -> list[Message]:
        out = self._messages.get(batched)
        if out is None:
            out = batch_messages(self.events) if batched else single_messages(self.events)
            self._messages[batched] = out
        return out

    def ws_bytes(self, batched: bool, deflate: Deflate | None) -> bytes:
        """Every message of the batch as WebSocket frames, ready for one ``sendall``."""
        key = (batched, deflate)
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
        """Roughly what the batch holds (for cache budgets)."""
        return sum(len(e.text) + 64 for e in self.events)
