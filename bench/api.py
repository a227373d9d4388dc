"""HTTP calls of the orchestrator: relay's API (post chats, stream status) and the upstream's
control endpoints (go, release, counts, stats, clock)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx


class RelayApi:
    """relay's public API as the bench user (bearer token)."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.ws_base = "ws" + base.removeprefix("http")
        self.token = token
        self.http = httpx.AsyncClient(
            base_url=base, headers={"Authorization": f"Bearer {token}"}, trust_env=False,
            timeout=60,
        )  # fmt: skip

    async def post_chats(self, messages: list[str], conc: int = 16) -> list[str]:
        """POST each message as a new chat (``conc`` in flight); return the stream IDs in order."""
        sids: list[str] = [""] * len(messages)
        sem = asyncio.Semaphore(conc)

        async def one(k: int) -> None:
            async with sem:
                resp = await self.http.post("/api/v1/chat", json={"message": messages[k]})
                resp.raise_for_status()
                sids[k] = resp.json()["streamId"]

        await asyncio.gather(*(one(k) for k in range(len(messages))))
        return sids

    async def stream(self, sid: str) -> dict[str, Any]:
        """Return the stream's status as the API reports it."""
        resp = await self.http.get(f"/api/v1/streams/{sid}")
        resp.raise_for_status()
        return dict(resp.json())

    async def wait_settled(
        self, sid: str, timeout: float, statuses: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """Wait until the stream's last seq stops moving (and its status is one of ``statuses``)."""
        deadline = time.monotonic() + timeout
        last, same = -1, 0
        while time.monotonic() < deadline:
            info = await self.stream(sid)
            seq = int(info["lastSeq"])
            same = same + 1 if seq == last and seq > 0 else 0
            last = seq
            if same >= 3 and (not statuses or info["status"] in statuses):
                return info
            await asyncio.sleep(0.1)
        raise TimeoutError(f"stream {sid} did not settle (last seq {last})")

    async def close(self) -> None:
        await self.http.aclose()


class UpstreamCtl:
    """The fake upstream's control endpoints."""

    def __init__(self, port: int) -> None:
        self.http = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", trust_env=False, timeout=60
        )

    async def _call(self, method: str, path: str) -> dict[str, Any]:
        resp = await self.http.request(method, path)
        resp.raise_for_status()
        return dict(resp.json())

    async def go(self) -> int:
        """Start every gated stream; return the upstream's go time (monotonic µs)."""
        return int((await self._call("POST", "/control/go"))["go_us"])

    async def release(self) -> None:
        """End every held response."""
        await self._call("POST", "/control/release")

    async def clock(self) -> int:
        """Return the upstream's CLOCK_MONOTONIC reading in µs."""
        return int((await self._call("GET", "/control/clock"))["clock_us"])

    async def count(self) -> dict[str, Any]:
        """Return how many streams arrived, were written and finished."""
        return await self._call("GET", "/control/count")

    async def stats(self) -> dict[str, Any]:
        """Return every stream's record and the pacing lag."""
        return await self._call("GET", "/control/stats")

    async def wait_for(self, key: str, n: int, timeout: float) -> None:
        """Wait until the count ``key`` (arrived, written, done) reaches n."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = (await self.count())[key]
            if got >= n:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"upstream: {key} {got} of {n} after {timeout:g} s")

    async def close(self) -> None:
        await self.http.aclose()
