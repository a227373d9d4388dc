"""Load generator process (``python -m bench.loadgen``): many WebSocket viewers on asyncio.

The orchestrator sends one JSON command per line on stdin and gets one JSON reply per line
(same ``id``) on stdout; progress goes to stderr. Commands: ``attach`` (open viewers, which
then read until the server closes), ``wait_closed``, ``report_now``, ``catchup``,
``dispatch``, ``clock`` and ``exit``. Latencies go to .npy files next to the process's log,
since a million numbers do not belong in a JSON line. bench/node/loadgen.mjs is the same in
Node (the default, BENCH_LOADGEN=node): keep the two in step.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import resource
import sys
import traceback
from array import array
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench import loadgen_runs
from bench.stats import now_us, r3, summarize
from bench.viewer import Tally

PIPE_LIMIT = 1 << 28  # a command can list 10,000 viewers


async def open_ws(url: str, token: str, timeout: float = 60.0) -> ClientConnection:
    """Open a viewer socket as a browser would: permessage-deflate offered, no client pings."""
    return await connect(
        url,
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=timeout,
        ping_interval=None,
        max_size=None,
        max_queue=None,
        proxy=None,
        close_timeout=5,
    )


async def follow(ws: ClientConnection, tally: Tally, lat: array[int]) -> None:
    """Read until the server closes, accounting for every message as it arrives."""
    try:
        async for raw in ws:
            tally.feed(raw, now_us(), lat)
    except ConnectionClosed as exc:  # a normal close ends the loop; this one did not say why
        tally.error = f"closed abnormally: {exc}"[:200]
    except Exception as exc:  # a bad message must not stop the other viewers
        tally.error = repr(exc)[:200]
    finally:
        tally.close_code = ws.close_code if ws.close_code is not None else 1006


class LoadGen:
    """Viewers attached by this process and the latencies they measured."""

    def __init__(self, outdir: Path) -> None:
        self.outdir = outdir
        self.tallies: list[Tally] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.lat: array[int] = array("q")
        self.attach_ms: list[float] = []

    async def attach(self, url: str, token: str, viewers: list[list[Any]], conc: int) -> Any:
        """Open every listed viewer ([stream id, stream idx, lines]); return once all are open."""
        sem = asyncio.Semaphore(conc)
        t0 = now_us()

        async def one(sid: str, s: int, n: int) -> None:
            tally = Tally(s, n)
            self.tallies.append(tally)
            async with sem:
                t = now_us()
                try:
                    ws = await open_ws(f"{url}/api/v1/streams/{sid}/ws?after=0&batch=1", token)
                except Exception as exc:
                    tally.error = f"connect: {exc!r}"[:200]
                    return
                self.attach_ms.append((now_us() - t) / 1000)
            tally.deflate = any(e.name == "permessage-deflate" for e in ws.protocol.extensions)
            self.tasks.append(asyncio.create_task(follow(ws, tally, self.lat)))

        await asyncio.gather(*(one(*v) for v in viewers))
        errors = [t.error for t in self.tallies if t.error]
        return {"attach_wall_ms": r3((now_us() - t0) / 1000), "opened": len(self.tasks),
                "errors": len(errors), "error_samples": errors[:3]}  # fmt: skip

    async def wait_closed(self, timeout_s: float) -> Any:
        """Wait for every viewer to be closed (at most timeout_s); return the report."""
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=timeout_s)
        return self.report()

    def report(self) -> Any:
        """Sum the viewers' accounts; write the latency samples (µs) to .npy files."""
        self.outdir.mkdir(parents=True, exist_ok=True)
        lat_path = self.outdir / f"lat-{os.getpid()}.npy"
        first_path = self.outdir / f"first-{os.getpid()}.npy"
        np.save(lat_path, np.frombuffer(self.lat, dtype=np.int64))
        firsts = [t.first_lat_us for t in self.tallies if t.first_lat_us is not None]
        np.save(first_path, np.asarray(firsts, dtype=np.int64))
        sums = collections.Counter[str]()
        shas: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for t in self.tallies:
            c = t.counts()
            for key in ("unique", "dup", "ooo", "foreign", "seq_gaps", "seq_dups", "msgs"):
                sums[key] += c[key]
            sums["complete"] += c["complete"]
            sums["closed"] += t.close_code is not None
            sums["deflate"] += t.deflate
            shas[str(t.s)][t.sha.hexdigest()] += 1
        return {
            "viewers": len(self.tallies), "opened": len(self.tasks), **sums,
            "close_codes": collections.Counter(str(t.close_code) for t in self.tallies),
            "terminals": collections.Counter(str(t.terminal) for t in self.tallies),
            "errors": [t.error for t in self.tallies if t.error][:5],
            "n_errors": sum(1 for t in self.tallies if t.error),
            "last_recv_us": max((t.last_recv_us for t in self.tallies), default=0),
            "sha_by_stream": shas, "attach_call_ms": summarize(self.attach_ms),
            "lat_file": str(lat_path), "first_file": str(first_path),
        }  # fmt: skip


async def execute(gen: LoadGen, cmd: dict[str, Any]) -> Any:
    """Run one command and return its reply payload."""
    name = cmd["cmd"]
    if name == "attach":
        return await gen.attach(cmd["url"], cmd["token"], cmd["viewers"], cmd["conc"])
    if name == "wait_closed":
        return await gen.wait_closed(cmd["timeout_s"])
    if name == "report_now":
        return gen.report()
    if name == "catchup":
        return await loadgen_runs.catchup(open_ws, **cmd["args"])
    if name == "dispatch":
        return await loadgen_runs.dispatch(open_ws, **cmd["args"])
    if name == "clock":
        return {"clock_us": now_us(), "pid": os.getpid()}
    if name == "exit":
        return {"pid": os.getpid()}
    raise ValueError(f"unknown command {name}")


async def serve(outdir: Path) -> None:
    """Answer commands from stdin until it closes or ``exit`` arrives."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=PIPE_LIMIT)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    gen = LoadGen(outdir)
    pending: set[asyncio.Task[None]] = set()

    async def run(cmd: dict[str, Any]) -> None:
        try:
            reply = {"id": cmd["id"], "ok": True, **(await execute(gen, cmd))}
        except Exception as exc:
            where = traceback.format_exc(limit=-2).strip().splitlines()
            reply = {"id": cmd["id"], "ok": False, "error": f"{exc!r} at {where[1:3]}"[:800]}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if cmd["cmd"] == "exit":
            os._exit(0)  # open sockets need no orderly close: the workload is over

    while line := await reader.readline():
        task = asyncio.create_task(run(json.loads(line)))
        pending.add(task)
        task.add_done_callback(pending.discard)


def main() -> None:
    """Raise the open-files limit and serve commands."""
    # 10,000 sockets in one process: take the hard limit on open files.
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(serve(Path(sys.argv[1])))


if __name__ == "__main__":
    main()
