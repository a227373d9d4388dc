"""One streamed chat completion of the fake upstream: its parameters, its deltas, its record.

Each delta's content is one line padded to CHUNK_CHARS, as in the peer's harness:
``"<stream idx>|<i>|<producer monotonic µs>|xx…\\n"``, stamped right when it is written.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from dataclasses import dataclass, field
from typing import Any

from bench.stats import now_us

# What the orchestrator posts as the user message; the upstream reads its plan from it.
PLAN = re.compile(r"bench s=(\d+) n=(\d+) rate=([\d.]+) offset_ms=([\d.]+) hold=([01]) gate=([01])")
# Unpaced streams hand this many events to the socket per write.
UNPACED_BATCH = 32
_HEAD = (
    'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":%d,'
    '"model":"bench","choices":[{"index":0,"delta":'
)


def plan_message(s: int, n: int, rate: float, offset_ms: float, hold: bool, gate: bool) -> str:
    """Return the user message that tells the upstream how to stream answer ``s``."""
    flags = f"hold={int(hold)} gate={int(gate)}"
    return f"bench s={s} n={n} rate={rate:g} offset_ms={offset_ms:.3f} {flags}"


@dataclass(frozen=True)
class Plan:
    """How the upstream streams one answer (parsed from the user message)."""

    s: int
    n: int
    rate: float
    offset_ms: float
    hold: bool
    gate: bool


def parse_plan(messages: list[dict[str, Any]]) -> Plan | None:
    """Find the plan in the newest user message, or None."""
    for m in reversed(messages):
        if m.get("role") == "user" and (hit := PLAN.search(str(m.get("content", "")))):
            s, n, rate, off, hold, gate = hit.groups()
            return Plan(int(s), int(n), float(rate), float(off), hold == "1", gate == "1")
    return None


@dataclass
class Record:
    """What the upstream did for one stream (times in monotonic µs)."""

    plan: Plan
    arrived_us: int
    first_us: int = 0
    last_us: int = 0
    done_us: int = 0
    produced: int = 0
    chars: int = 0
    disconnected: bool = False
    sha: Any = field(default_factory=hashlib.sha256)

    def as_json(self) -> dict[str, Any]:
        """Return the record as JSON-ready values."""
        return {
            "arrived_us": self.arrived_us, "first_us": self.first_us, "last_us": self.last_us,
            "done_us": self.done_us, "produced": self.produced, "chars": self.chars,
            "sha256": self.sha.hexdigest(), "disconnected": self.disconnected,
        }  # fmt: skip


def line(s: int, i: int, t: int, width: int) -> str:
    """Return chunk i of stream s stamped t, padded to ``width`` characters (peer format)."""
    base = f"{s}|{i}|{t}"
    room = width - len(base) - 1
    return base + "\n" if room <= 0 else base + "|" + "x" * (room - 1) + "\n"


def http_chunk(payload: bytes) -> bytes:
    """Frame bytes as one HTTP/1.1 chunked-encoding chunk."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def content_event(text: str) -> bytes:
    """Return the SSE event carrying one delta of content."""
    # Lines hold digits, "|" and "x": only the newline needs JSON escaping.
    body = text[:-1] + "\\n" if text.endswith("\n") else text
    head = _HEAD % int(time.time())
    return f'{head}{{"content":"{body}"}},"finish_reason":null}}]}}\n\n'.encode()


def role_event() -> bytes:
    """Return the first SSE event, which only names the role."""
    head = _HEAD % int(time.time())
    return f'{head}{{"role":"assistant","content":""}},"finish_reason":null}}]}}\n\n'.encode()


def closing_events(produced: int) -> bytes:
    """Return the finish chunk, the usage chunk and ``[DONE]``, as OpenAI sends them."""
    head = _HEAD % int(time.time())
    usage = f'{{"prompt_tokens":12,"completion_tokens":{produced},"total_tokens":{produced + 12}}}'
    stop = f'{head}{{}},"finish_reason":"stop"}}]}}\n\n'
    tail = head.split('"choices"')[0] + f'"choices":[],"usage":{usage}}}\n\n'
    return (stop + tail + "data: [DONE]\n\n").encode()


class Emitter:
    """Write one stream's deltas to its response, paced or as fast as the socket takes them."""

    def __init__(self, writer: asyncio.StreamWriter, rec: Record, width: int, lag: list[int]):
        self.writer = writer
        self.rec = rec
        self.width = width
        self.lag = lag

    def _emit(self, i: int, t: int) -> bytes:
        text = line(self.rec.plan.s, i, t, self.width)
        rec = self.rec
        rec.produced += 1
        rec.chars += len(text)
        rec.sha.update(text.encode())
        if not rec.first_us:
            rec.first_us = t
        rec.last_us = t
        return content_event(text)

    async def paced(self, base_us: int) -> None:
        """Write chunk i at base + offset + i * period (monotonic), recording the lag."""
        plan = self.rec.plan
        period_us = 1e6 / plan.rate
        start = base_us + plan.offset_ms * 1000
        for i in range(plan.n):
            due = int(start + i * period_us)
            wait = due - now_us()
            if wait > 0:
                await asyncio.sleep(wait / 1e6)
            t = now_us()
            self.lag.append(t - due)
            self.writer.write(http_chunk(self._emit(i, t)))
            await self.writer.drain()

    async def unpaced(self) -> None:
        """Write every chunk as fast as the socket takes them, many events per write."""
        n = self.rec.plan.n
        for start in range(0, n, UNPACED_BATCH):
            events = [self._emit(i, now_us()) for i in range(start, min(n, start + UNPACED_BATCH))]
            self.writer.write(http_chunk(b"".join(events)))
            await self.writer.drain()
            await asyncio.sleep(0)  # let the other unpaced streams take their turn
