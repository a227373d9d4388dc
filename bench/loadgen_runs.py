"""One-shot viewer runs of the load generator: catch-up readers and sequential dispatches."""

from __future__ import annotations

import asyncio
import json
from array import array
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from bench.stats import now_us, r3
from bench.viewer import Tally

Opener = Callable[[str, str], Awaitable[ClientConnection]]
STREAMED = "streamed"  # a dispatch item's flow: the answer on the post's own response


async def catchup(
    open_ws: Opener, url: str, token: str, k: int, reps: int, mode: str,
    expect_chars: int, expect_sha: str, timeout_s: float,
) -> dict[str, Any]:  # fmt: skip
    """Run ``reps`` rounds of ``k`` viewers attaching at once from seq 0."""
    runs = []
    for _ in range(reps):
        t0 = now_us()
        one = _CatchupViewer(open_ws, url, token, mode, expect_chars, expect_sha)
        viewers = await asyncio.gather(*(one.run(timeout_s) for _ in range(k)))
        runs.append({"wall_ms": r3((now_us() - t0) / 1000), "viewers": viewers})
    return {"runs": runs}


class _CatchupViewer:
    """One catch-up read: connect, then read to the last chunk (live) or to ``done``."""

    def __init__(
        self, open_ws: Opener, url: str, token: str, mode: str, chars: int, sha: str
    ) -> None:
        self.open_ws, self.url, self.token = open_ws, url, token
        self.mode, self.chars, self.sha = mode, chars, sha

    def _finished(self, tally: Tally) -> bool:
        if self.mode == "live":
            return tally.chars >= self.chars
        return tally.terminal is not None

    async def run(self, timeout_s: float) -> dict[str, Any]:
        """Return this viewer's times, message count, exactness and close code."""
        tally = Tally(0, 0, parse=False)
        lat: array[int] = array("q")
        out: dict[str, Any] = {}
        t0 = now_us()
        ws: ClientConnection | None = None
        try:
            async with asyncio.timeout(timeout_s):
                ws = await self.open_ws(self.url, self.token)
                out["connect_ms"] = r3((now_us() - t0) / 1000)
                async for raw in ws:
                    t = now_us()
                    out.setdefault("first_ms", r3((t - t0) / 1000))
                    tally.feed(raw, t, lat)
                    if self._finished(tally):
                        out["ms"] = r3((t - t0) / 1000)
                        break
        except TimeoutError:
            tally.error = f"incomplete after {timeout_s:g} s: {tally.chars} of {self.chars} chars"
        except (ConnectionClosed, OSError, InvalidHandshake, ValueError) as exc:
            # A refused handshake or a bad message fails this viewer, not the whole case.
            tally.error = repr(exc)[:200]
        if ws is not None:
            await self._close(ws, tally)
        exact = (
            tally.seq_gaps == 0 and tally.seq_dups == 0 and tally.chars == self.chars
            and tally.sha.hexdigest() == self.sha
            and (self.mode == "live" or tally.terminal == "done")
        )  # fmt: skip
        return {**out, "msgs": tally.msgs, "chars": tally.chars, "exact": exact,
                "close_code": tally.close_code, "error": tally.error}  # fmt: skip

    async def _close(self, ws: ClientConnection, tally: Tally) -> None:
        # A finished stream is closed by the server (1000) after done; a live one by us.
        try:
            if self.mode == "finished" and tally.error is None:
                async with asyncio.timeout(5):
                    await ws.wait_closed()
            else:
                await ws.close()
        except (TimeoutError, ConnectionClosed, OSError):
            pass
        tally.close_code = ws.close_code if ws.close_code is not None else 1006


async def dispatch(
    open_ws: Opener, http_url: str, ws_url: str, token: str, items: list[dict[str, Any]],
    timeout_s: float,
) -> dict[str, Any]:  # fmt: skip
    """POST each chat in turn, open its socket, read to the end; return the timestamps."""
    auth = {"Authorization": f"Bearer {token}"}
    results = []
    async with httpx.AsyncClient(base_url=http_url, headers=auth, trust_env=False) as http:
        for item in items:
            try:
                async with asyncio.timeout(timeout_s):
                    if item.get("flow") == STREAMED:
                        results.append(await _dispatch_streamed(http, item))
                    else:
                        results.append(await _dispatch_one(open_ws, http, ws_url, token, item))
            except Exception as exc:
                results.append({"s": item["s"], "error": repr(exc)[:200]})
    return {"results": results}


async def _dispatch_one(
    open_ws: Opener, http: httpx.AsyncClient, ws_url: str, token: str, item: dict[str, Any]
) -> dict[str, Any]:
    t_post = now_us()
    resp = await http.post("/api/v1/chat", json={"message": item["message"]})
    t_posted = now_us()
    resp.raise_for_status()
    sid = resp.json()["streamId"]
    t_ws = now_us()
    ws = await open_ws(f"{ws_url}/api/v1/streams/{sid}/ws?after=0&batch=1", token)
    t_open = now_us()
    tally = Tally(item["s"], item["n"])
    lat: array[int] = array("q")
    first = None
    try:
        async for raw in ws:
            t = now_us()
            tally.feed(raw, t, lat)
            if first is None and tally.chars:
                first = t
    except ConnectionClosed:
        pass
    return {
        "s": item["s"], "stream_id": sid, "post_start_us": t_post, "post_end_us": t_posted,
        "ws_start_us": t_ws, "ws_open_us": t_open, "first_chunk_us": first,
        "close_code": ws.close_code, "complete": tally.complete, "terminal": tally.terminal,
    }  # fmt: skip


async def _dispatch_streamed(http: httpx.AsyncClient, item: dict[str, Any]) -> dict[str, Any]:
    """POST asking for the answer on the response (Accept: text/event-stream): the ``turn``
    event, then the events, read to the terminal one."""
    t_post = now_us()
    tally = Tally(item["s"], item["n"])
    lat: array[int] = array("q")
    first = t_turn = sid = None
    headers = {"Accept": "text/event-stream"}
    body = {"message": item["message"]}
    async with http.stream("POST", "/api/v1/chat?batch=1", json=body, headers=headers) as resp:
        resp.raise_for_status()
        kind, data = "", ""
        async for line in resp.aiter_lines():
            if line:
                name, _, value = line.partition(":")
                if name == "event":
                    kind = value.strip()
                elif name == "data":
                    data = value.removeprefix(" ")
                continue
            if not data:
                continue
            t = now_us()
            if kind == "turn":
                sid, t_turn = json.loads(data)["streamId"], t
            else:
                tally.feed(data, t, lat)
                if first is None and tally.chars:
                    first = t
            kind, data = "", ""
            if tally.terminal:
                break
    return {
        "s": item["s"], "stream_id": sid, "post_start_us": t_post, "turn_us": t_turn,
        "first_chunk_us": first, "close_code": None, "complete": tally.complete,
        "terminal": tally.terminal, "flow": STREAMED,
    }  # fmt: skip
