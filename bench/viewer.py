"""What one WebSocket viewer received: seq continuity, exact text, and per-line latency.

A message is a single event (``chunk``, ``done``, ``cancelled``, ``error``, ``resumed``) or
the batch form ``{"type": "chunks", "seq": 7, "texts": [...]}`` standing for chunk events
with seq 7, 8, ...; both are accepted.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from typing import Any


class Tally:
    """One viewer's account of one stream (stream index ``s``, ``n`` lines expected)."""

    def __init__(self, s: int, n: int, *, parse: bool = True) -> None:
        self.s = s
        self.n = n
        self.parse = parse
        self.seen = bytearray(n)
        self.unique = self.dup = self.ooo = self.foreign = 0
        self.last_i = -1
        self.next_seq = 1
        self.seq_gaps = self.seq_dups = 0
        self.msgs = self.chars = 0
        self.sha = hashlib.sha256()
        self.carry = ""
        self.terminal: str | None = None
        self.error_event: Any = None
        self.first_lat_us: int | None = None
        self.last_recv_us = 0
        self.close_code: int | None = None
        self.error: str | None = None
        self.deflate = False  # the server's reply negotiated permessage-deflate

    def feed(self, raw: str | bytes, t: int, lat: array[int]) -> None:
        """Account for one message received at monotonic time ``t`` (µs)."""
        self.msgs += 1
        ev = json.loads(raw)
        kind = ev.get("type")
        if kind == "queued":  # a queue notice: no seq, no event of the log
            return
        seq = int(ev.get("seq", 0))
        if kind == "chunk":
            texts = [ev["text"]]
        elif kind == "chunks":
            texts = ev["texts"]
        else:
            if self._seq(seq, 1) and kind in ("done", "cancelled", "error"):
                self.terminal = kind
                self.error_event = ev.get("error")
            return
        if not self._seq(seq, len(texts)):
            return
        text = "".join(texts)
        self.chars += len(text)
        self.sha.update(text.encode())
        self.last_recv_us = t
        if self.parse:
            self._lines(text, t, lat)

    def _seq(self, seq: int, count: int) -> bool:
        """Check continuity; False for a message that repeats seqs already seen."""
        if seq == self.next_seq:
            self.next_seq += count
            return True
        if seq < self.next_seq:
            self.seq_dups += count
            return False
        self.seq_gaps += seq - self.next_seq
        self.next_seq = seq + count
        return True

    def _lines(self, text: str, t: int, lat: array[int]) -> None:
        parts = (self.carry + text).split("\n")
        self.carry = parts.pop()
        for ln in parts:
            f = ln.split("|", 3)
            try:
                s, i, stamp = int(f[0]), int(f[1]), int(f[2])
            except (ValueError, IndexError):
                self.foreign += 1
                continue
            if s != self.s or not 0 <= i < self.n:
                self.foreign += 1
                continue
            if self.seen[i]:
                self.dup += 1
            else:
                self.seen[i] = 1
                self.unique += 1
            if i < self.last_i:
                self.ooo += 1
            self.last_i = i
            lat.append(t - stamp)
            if i == 0:
                self.first_lat_us = t - stamp

    @property
    def complete(self) -> bool:
        """Every line exactly once, in order, and no seq gap or repeat."""
        return self.unique == self.n and not (
            self.dup or self.ooo or self.foreign or self.seq_gaps or self.seq_dups
        )

    def counts(self) -> dict[str, Any]:
        """Return this viewer's counts and how it ended."""
        return {
            "unique": self.unique, "dup": self.dup, "ooo": self.ooo, "foreign": self.foreign,
            "seq_gaps": self.seq_gaps, "seq_dups": self.seq_dups, "msgs": self.msgs,
            "chars": self.chars, "complete": self.complete, "terminal": self.terminal,
            "close_code": self.close_code, "error": self.error,
        }  # fmt: skip
