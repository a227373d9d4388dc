"""The chaos test: many answers streamed to viewers that drop and re-attach at random, over
WebSocket and SSE, while a web process and a worker are SIGKILLed, a worker is SIGTERMed, and
Redis and the database are restarted, all real processes.

With ``redis="sentinel"`` Redis is a master, a replica and three sentinels
(tests/sentinel.py), relay talks to it through its ``redis+sentinel://`` URL, and the Redis
fault is a failover: the master is SIGKILLed, a sentinel promotes the replica, and the old
master comes back as a replica of the new one.

It checks what issue 9 promises (never lose or freeze an answer): for every stream, the seqs
its viewer received over all its connections are exactly 1..n (none lost, none twice), the
last is the one terminal event and it is ``done``, the streamed text equals the stored answer
and its content hash, and no stream is left non-terminal in SQL or in the log. It measures,
per fault, what viewers saw: their longest pause, the reconnects and their close codes or
HTTP statuses, and the time until every affected stream moved again.

``run_chaos(size, tmpdir)`` returns the figures as a dict; ``tests/test_chaos.py`` runs a
bounded size under pytest, ``make chaos`` a bigger one (``python -m tests.chaos``), which
prints them as JSON. No pytest import here, so both can use it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import sqlalchemy as sa
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from models.db import normalize_url
from models.migrate import upgrade
from models.redisconn import make_redis
from ops.redis_server import EmbeddedRedis, free_port
from tests.pgserver import PgServer
from tests.procs import Proc, stack_env, start_web, start_worker
from tests.sentinel import Sentinels

TERMINAL = {"done", "cancelled", "error"}
CHUNKS_PER_WORD = 1.75  # the demo generator's pieces are 1 to 6 characters
IDLE_S = 20.0  # a connection that brings nothing for this long is dropped and re-attached


@dataclass(frozen=True)
class ChaosSize:
    """How big a run is: answers of ``answer_s`` seconds at ``rate`` chunks a second each."""

    streams: int = 40
    rate: float = 10.0
    answer_s: float = 55.0
    workers: int = 3
    drop_p: float = 0.8  # the chance that a viewer drops a connection at a random moment
    seed: int = 9
    redis: str = "single"  # or "sentinel": a master, a replica and three sentinels

    @property
    def words(self) -> int:
        return max(20, int(self.answer_s * self.rate / CHUNKS_PER_WORD))

    @property
    def concurrency(self) -> int:
        # Every stream fits on two workers: the one left while another is replaced.
        return math.ceil(self.streams / 2) + 4


def chaos_env(redis_url: str, database_url: str) -> dict[str, str]:
    """The environment of every process: a test stack's (tests/procs.py ``stack_env``), the
    answers' pace set per message instead."""
    env = stack_env(redis_url, database_url)
    env.pop("RELAY_DEMO_CHUNKS_PER_SECOND")
    env["SECRET_KEY"] = "chaos-secret-key"
    return env


# -- viewers ----------------------------------------------------------------------------------


@dataclass
class Conn:
    """One connection of a viewer, and how it ended."""

    kind: str  # "ws" or "sse"
    port: int
    start: float
    end: float = 0.0
    events: int = 0
    outcome: str = "cut off"  # "dropped" (by the viewer), "ws 1000", "ws 1006", "http 503", ...
    last: bool = False  # the server ended it after the terminal event: the viewer is done

    @property
    def voluntary(self) -> bool:
        return self.outcome == "dropped"


@dataclass
class Viewer:
    """A user following one answer: every event received, over every connection, in order."""

    stream_id: str
    chat_id: str
    received: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    conns: list[Conn] = field(default_factory=list)
    finished: bool = False
    api_content: str | None = None  # the stored answer, as GET /api/v1/chats/<chatId> gives it

    @property
    def last_seq(self) -> int:
        return max((e["seq"] for _, e in self.received), default=0)

    @property
    def ended(self) -> bool:
        """It has received a terminal event as its newest event."""
        return bool(self.received) and self.received[-1][1]["type"] in TERMINAL

    def take(self, event: dict[str, Any]) -> None:
        self.received.append((time.monotonic(), event))
        self.conns[-1].events += 1

    def times(self) -> list[float]:
        return [t for t, _ in self.received]

    def open_on(self, port: int) -> bool:
        return bool(self.conns) and self.conns[-1].port == port and not self.conns[-1].end


def expand(message: dict[str, Any]) -> list[dict[str, Any]]:
    """A ``chunks`` message (batch form) as the events it stands for (a queue notice
    stands for none: it is no event of the log)."""
    if message["type"] == "queued":
        return []
    if message["type"] != "chunks":
        return [message]
    return [
        {"type": "chunk", "seq": message["seq"] + i, "text": text}
        for i, text in enumerate(message["texts"])
    ]


@dataclass
class Viewing:
    """What every viewer shares: the web ports, the cookie, the HTTP client, a random source."""

    ports: list[int]
    cookie: str
    http: httpx.AsyncClient
    rng: random.Random
    drop_p: float


async def follow(viewer: Viewer, ctx: Viewing, deadline: float) -> None:
    """Attach, read, drop at a random moment and re-attach after the last seq seen, to a
    random web process (the other one after a failure), until the server ends the attach
    after a terminal event."""
    backoff = 0.1
    avoid = 0
    while not viewer.finished and time.monotonic() < deadline:
        port = ctx.rng.choice([p for p in ctx.ports if p != avoid] or ctx.ports)
        conn = Conn(ctx.rng.choice(["ws", "sse"]), port, time.monotonic())
        viewer.conns.append(conn)
        hold = ctx.rng.uniform(0.5, 10.0) if ctx.rng.random() < ctx.drop_p else None
        try:
            async with asyncio.timeout(hold) as cm:
                conn.outcome = await attach_once(viewer, ctx, conn, ctx.rng.random() < 0.3)
        except TimeoutError:
            conn.outcome = "dropped" if cm.expired() else "timeout"
        except InvalidStatus as exc:  # the WebSocket upgrade was answered with an HTTP status
            conn.outcome = f"http {exc.response.status_code}"
        except (OSError, httpx.HTTPError, InvalidHandshake) as exc:
            conn.outcome = type(exc).__name__
        conn.end = time.monotonic()
        avoid = 0
        if conn.outcome in {"ws 1000", "sse end", "http 204"} and viewer.ended:
            viewer.finished = conn.last = True
        elif conn.voluntary or conn.events:
            backoff = 0.1
            await asyncio.sleep(ctx.rng.uniform(0.0, 0.3))
        else:  # refused, 503, 1013, ...: back off and try the other process
            avoid = port
            await asyncio.sleep(backoff * ctx.rng.uniform(0.5, 1.5))
            backoff = min(backoff * 2, 2.0)


async def attach_once(viewer: Viewer, ctx: Viewing, conn: Conn, batch: bool) -> str:
    query = f"after={viewer.last_seq}" + ("&batch=1" if batch else "")
    path = f"/api/v1/streams/{viewer.stream_id}"
    if conn.kind == "ws":
        return await attach_ws(viewer, ctx, f"ws://127.0.0.1:{conn.port}{path}/ws?{query}")
    return await attach_sse(viewer, ctx, f"http://127.0.0.1:{conn.port}{path}/events?{query}")


async def attach_ws(viewer: Viewer, ctx: Viewing, url: str) -> str:
    headers = {"Cookie": ctx.cookie}
    async with connect(
        url, additional_headers=headers, open_timeout=10, close_timeout=2, max_queue=None,
        ping_interval=None,
    ) as ws:  # fmt: skip
        try:
            while True:
                raw = await asyncio.wait_for(ws.recv(), IDLE_S)
                for event in expand(json.loads(raw)):
                    viewer.take(event)
        except ConnectionClosed as closed:
            return f"ws {closed.rcvd.code if closed.rcvd else 1006}"
        except TimeoutError:
            return "idle"


async def attach_sse(viewer: Viewer, ctx: Viewing, url: str) -> str:
    headers = {"Last-Event-ID": str(viewer.last_seq)}
    timeout = httpx.Timeout(10.0, read=IDLE_S)
    async with ctx.http.stream("GET", url, headers=headers, timeout=timeout) as resp:
        if resp.status_code != 200:
            return f"http {resp.status_code}"
        data = ""
        try:
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    data = line[5:].strip()
                elif not line and data:
                    for event in expand(json.loads(data)):
                        viewer.take(event)
                    data = ""
        except httpx.ReadTimeout:
            return "idle"
        except httpx.HTTPError as exc:  # the process died mid-response
            return type(exc).__name__
        return "sse end"


# -- the processes ----------------------------------------------------------------------------


class Cluster:
    """Redis (persistent), PostgreSQL, web processes on fixed ports and Celery workers."""

    def __init__(self, size: ChaosSize, tmpdir: Path) -> None:
        self.size = size
        self.logdir = tmpdir / "logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.redis_server = EmbeddedRedis(tmpdir / "redis", persistent=True)
        self.sentinels = Sentinels(tmpdir / "sentinel") if size.redis == "sentinel" else None
        self.pg = PgServer()
        self.env: dict[str, str] = {}
        self.webs: dict[int, Proc] = {}
        self.workers: list[Proc] = []
        self.gone: list[Proc] = []  # killed or stopped: their logs stay readable
        self.worker_count = 0
        self.lock = threading.Lock()

    @property
    def redis_url(self) -> str:
        return self.redis_server.url if self.sentinels is None else self.sentinels.url

    def start(self) -> None:
        if self.sentinels is None:
            self.redis_server.start()
        else:
            self.sentinels.start()
        self.pg.start()
        upgrade(self.pg.url)
        self.env = chaos_env(self.redis_url, self.pg.url)
        # Started side by side: each takes seconds to import and connect.
        with ThreadPoolExecutor() as pool:
            starting = [pool.submit(self.add_worker) for _ in range(self.size.workers)]
            starting += [pool.submit(self.add_web, free_port()) for _ in range(2)]
            for future in starting:
                future.result()

    def add_web(self, port: int) -> Proc:
        proc = self.webs[port] = start_web(self.env, port, self.logdir)
        return proc

    def add_worker(self) -> Proc:
        with self.lock:
            self.worker_count += 1
            name = f"c{self.worker_count}"
        proc = start_worker(self.env, self.logdir, name, concurrency=self.size.concurrency)
        self.workers.append(proc)
        return proc

    def redis(self) -> redis.Redis:
        return make_redis(self.redis_url, max_connections=4, wait_s=10)

    def worker_logs(self) -> dict[str, str]:
        procs = [p for p in [*self.workers, *self.gone] if p.name.startswith("worker")]
        return {p.log_path.name: p.output() for p in procs}

    def close(self) -> None:
        """Stop everything this run started, by pid, whatever happened."""
        for proc in [*self.webs.values(), *self.workers]:
            with contextlib.suppress(Exception):
                proc.kill()
        with contextlib.suppress(Exception):
            self.redis_server.stop()
        if self.sentinels is not None:
            with contextlib.suppress(Exception):
                self.sentinels.stop()
        self.pg.close()


# -- faults -----------------------------------------------------------------------------------


@dataclass
class Fault:
    """One fault: when it hit, when the component was back, and the streams it hit."""

    name: str
    start: float
    restored: float = 0.0
    affected: list[str] = field(default_factory=list)
    live: int = 0
    note: str = ""


class Chaos:
    """Injects the faults one after another, each once every stream it hit moved again."""

    def __init__(self, cluster: Cluster, viewers: list[Viewer], stop: threading.Event) -> None:
        self.cluster = cluster
        self.viewers = viewers
        self.stop = stop
        self.faults: list[Fault] = []
        self.rng = random.Random(cluster.size.seed)

    def run(self) -> None:
        steps: list[Callable[[], None]] = [
            self.web_sigkill, self.worker_sigkill, self.worker_sigterm,
            self.redis_restart, self.database_restart,
        ]  # fmt: skip
        for step in steps:
            if self.stop.is_set():
                return
            step()
            self.settle(self.faults[-1])
            self.stop.wait(1.5)

    def live(self) -> list[Viewer]:
        return [v for v in self.viewers if not v.ended]

    def begin(self, name: str, affected: list[str]) -> Fault:
        fault = Fault(name, time.monotonic(), affected=affected, live=len(self.live()))
        self.faults.append(fault)
        return fault

    def settle(self, fault: Fault, timeout: float = 40.0) -> None:
        """Wait until every stream the fault hit has received an event since it was over."""
        hit = set(fault.affected)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stop.is_set():
            waiting = [
                v for v in self.viewers
                if v.stream_id in hit and not v.ended
                and not (v.received and v.received[-1][0] > fault.restored)
            ]  # fmt: skip
            if not waiting:
                return
            time.sleep(0.1)

    def web_sigkill(self) -> None:
        port = self.rng.choice(sorted(self.cluster.webs))
        victim = self.cluster.webs[port]
        affected = [v.stream_id for v in self.live() if v.open_on(port)]
        fault = self.begin("web_sigkill", affected)
        victim.kill()
        fault.restored = fault.start  # the other web process serves at once
        self.cluster.gone.append(victim)
        self.cluster.webs[port] = start_web(self.cluster.env, port, self.cluster.logdir)
        fault.note = f"web on port {port} SIGKILLed; a new one started on it"

    def writers(self) -> Counter[int]:
        """How many live streams each worker pid is writing now (from the log's state)."""
        client = self.cluster.redis()
        try:
            names = [client.hget(f"relay:{{{v.stream_id}}}:state", "worker") for v in self.live()]
        finally:
            client.close()
        return Counter(int(str(n).rsplit(":", 1)[1]) for n in names if n)

    def busiest_worker(self) -> tuple[Proc, list[str]]:
        counts = self.writers()
        victim = max(self.cluster.workers, key=lambda w: counts.get(w.pid, 0))
        client = self.cluster.redis()
        try:
            hit = [
                v.stream_id
                for v in self.live()
                if str(client.hget(f"relay:{{{v.stream_id}}}:state", "worker")).endswith(
                    f":{victim.pid}"
                )
            ]
        finally:
            client.close()
        return victim, hit

    def worker_sigkill(self) -> None:
        victim, hit = self.busiest_worker()
        fault = self.begin("worker_sigkill", hit)
        victim.kill()
        fault.restored = fault.start
        self.cluster.workers.remove(victim)
        self.cluster.gone.append(victim)
        self.cluster.add_worker()
        fault.note = f"worker pid {victim.pid} SIGKILLed writing {len(hit)} streams"

    def worker_sigterm(self) -> None:
        victim, hit = self.busiest_worker()
        fault = self.begin("worker_sigterm", hit)
        exited: list[float] = []

        def wait_exit() -> None:
            victim.popen.wait()
            exited.append(time.monotonic())

        waiter = threading.Thread(target=wait_exit, daemon=True)
        victim.popen.send_signal(signal.SIGTERM)
        waiter.start()
        fault.restored = fault.start
        self.cluster.workers.remove(victim)
        self.cluster.gone.append(victim)
        self.cluster.add_worker()  # as a supervisor would, at once
        waiter.join(60)
        left = (
            f"it exited {victim.popen.returncode} after {exited[0] - fault.start:.1f} s"
            if exited
            else "it did not exit within 60 s and was SIGKILLed"
        )
        victim.stop()
        fault.note = f"worker pid {victim.pid} SIGTERMed writing {len(hit)} streams; {left}"

    def redis_restart(self) -> None:
        if self.cluster.sentinels is not None:
            self.redis_failover(self.cluster.sentinels)
            return
        fault = self.begin("redis_restart", [v.stream_id for v in self.live()])
        self.cluster.redis_server.stop()
        time.sleep(2.0)
        self.cluster.redis_server.start()
        fault.restored = time.monotonic()
        fault.note = "Redis stopped (SIGTERM, append-only file kept) for 2 s, then started"

    def redis_failover(self, sentinels: Sentinels) -> None:
        fault = self.begin("redis_failover", [v.stream_id for v in self.live()])
        old = sentinels.kill_master()
        new = sentinels.wait_for_failover(old)
        fault.restored = time.monotonic()
        sentinels.rejoin(old, new)  # back, as the new master's replica
        fault.note = (
            f"Redis master :{old} SIGKILLed; the sentinels promoted :{new} after "
            f"{fault.restored - fault.start:.1f} s; :{old} restarted as its replica"
        )

    def database_restart(self) -> None:
        fault = self.begin("database_restart", [v.stream_id for v in self.live()])
        self.cluster.pg.stop()
        time.sleep(2.5)
        self.cluster.pg.start()
        fault.restored = time.monotonic()
        fault.note = "PostgreSQL stopped (fast shutdown) for 2.5 s, then started"


# -- the run ----------------------------------------------------------------------------------


async def post_all(size: ChaosSize, ports: list[int], http: httpx.AsyncClient) -> list[Viewer]:
    """Post the chats (the first post makes the guest user, the rest share its cookie)."""

    async def post(i: int) -> Viewer:
        message = f"Chaos answer {i} about write-ahead logs [demo:words={size.words}] " + (
            f"[demo:rate={size.rate:g}]"
        )
        url = f"http://127.0.0.1:{ports[i % len(ports)]}/api/v1/chat"
        resp = await http.post(url, json={"message": message}, timeout=30)
        if resp.status_code != 202:
            raise RuntimeError(f"post {i} answered {resp.status_code}: {resp.text}")
        data = resp.json()
        return Viewer(data["streamId"], data["chatId"])

    first = await post(0)
    gate = asyncio.Semaphore(8)

    async def gated(i: int) -> Viewer:
        async with gate:
            return await post(i)

    rest = await asyncio.gather(*(gated(i) for i in range(1, size.streams)))
    return [first, *rest]


async def stream_all(
    cluster: Cluster, size: ChaosSize, timeout: float
) -> tuple[list[Viewer], list[Fault], float]:
    """Post, follow every answer while the faults happen, and wait for the ends."""
    ports = sorted(cluster.webs)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=50)
    async with httpx.AsyncClient(limits=limits) as http:
        viewers = await post_all(size, ports, http)
        cookie = "; ".join(f"{k}={v}" for k, v in http.cookies.items())
        # The chaos thread restarts a web process on the same port; viewers read the dict.
        ctx = Viewing(ports, cookie, http, random.Random(size.seed), size.drop_p)
        deadline = time.monotonic() + timeout
        tasks = [asyncio.create_task(follow(v, ctx, deadline)) for v in viewers]
        await asyncio.sleep(3.0)  # every answer under way before the first fault
        stop = threading.Event()
        chaos = Chaos(cluster, viewers, stop)
        started = time.monotonic()
        faults = asyncio.create_task(asyncio.to_thread(chaos.run))
        try:
            await asyncio.wait(tasks, timeout=max(1.0, deadline - time.monotonic()))
        finally:
            stop.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await faults
        await fetch_answers(viewers, ports[0], http)
        return viewers, chaos.faults, started


async def fetch_answers(viewers: list[Viewer], port: int, http: httpx.AsyncClient) -> None:
    """Each answer as the API gives it (GET /api/v1/chats/<chatId>)."""
    gate = asyncio.Semaphore(8)

    async def fetch(viewer: Viewer) -> None:
        async with gate:
            url = f"http://127.0.0.1:{port}/api/v1/chats/{viewer.chat_id}"
            resp = await http.get(url, timeout=30)
            resp.raise_for_status()
            answers = [m for m in resp.json()["messages"] if m["role"] == "assistant"]
            viewer.api_content = answers[-1]["content"]

    await asyncio.gather(*(fetch(v) for v in viewers))


@dataclass
class Verdict:
    """What the checks found for one stream."""

    stream_id: str
    lost: int = 0
    duplicated: int = 0
    problems: list[str] = field(default_factory=list)


def check_stream(viewer: Viewer, stored: dict[str, Any]) -> Verdict:
    """Seqs 1..n, once each, one terminal event last and ``done``, text and hash as stored.
    A viewer that never got its end is reported frozen, with only the seqs it got checked
    (what it missed after it stopped is not lost: it is not over)."""
    verdict = Verdict(viewer.stream_id)
    events = [e for _, e in viewer.received]
    if not viewer.finished or not events:
        last = events[-1]["seq"] if events else 0
        verdict.problems.append(
            f"frozen: the viewer never got the end (last seq {last}; log at "
            f"{stored['log_seq']}, {stored['log_status']}; SQL {stored['status']})"
        )
        check_seqs(viewer, {**stored, "log_seq": last}, verdict)
        return verdict
    check_seqs(viewer, stored, verdict)
    check_end(viewer, stored, verdict)
    if events[-1]["type"] != "done":
        verdict.problems.append(f"ended {events[-1]['type']}: {events[-1].get('error')}")
    check_text(events, stored, verdict)
    states = (stored["status"], stored["message_status"], stored["log_status"])
    if states != ("done", "complete", "done"):
        verdict.problems.append(
            f"status: SQL {stored['status']}, message {stored['message_status']}, "
            f"log {stored['log_status']}"
        )
    return verdict


def check_seqs(viewer: Viewer, stored: dict[str, Any], verdict: Verdict) -> None:
    """Every seq the log holds received once, in order."""
    seqs = [e["seq"] for _, e in viewer.received]
    final = max([stored["log_seq"], *seqs], default=0)
    counts = Counter(seqs)
    missing = sorted(set(range(1, final + 1)) - set(seqs))
    verdict.duplicated = sum(n - 1 for n in counts.values())
    verdict.lost = len(missing)
    if missing or verdict.duplicated or seqs != sorted(seqs):
        twice = sorted(seq for seq, n in counts.items() if n > 1)
        verdict.problems.append(
            f"seqs: lost {missing[:5]} ({len(missing)}), twice {twice[:5]} "
            f"({verdict.duplicated}), log's last seq {stored['log_seq']}"
        )


def check_end(viewer: Viewer, stored: dict[str, Any], verdict: Verdict) -> None:
    """One terminal event, the last, at the seq SQL has as the stream's last."""
    terminals = [(e["type"], e["seq"]) for _, e in viewer.received if e["type"] in TERMINAL]
    if len(terminals) != 1 or viewer.received[-1][1]["type"] not in TERMINAL:
        verdict.problems.append(f"terminal events {terminals}")
    final = viewer.last_seq
    if stored["last_seq"] != final:
        verdict.problems.append(
            f"SQL's last seq {stored['last_seq']} is not the terminal seq {final} viewers got"
        )


def check_text(events: list[dict[str, Any]], stored: dict[str, Any], verdict: Verdict) -> None:
    """The chunks' text is the stored answer (SQL and the API) and its content hash."""
    ordered = sorted({e["seq"]: e for e in events}.values(), key=lambda e: e["seq"])
    text = "".join(e["text"] for e in ordered if e["type"] == "chunk")
    for where in ("content", "api_content"):
        if text != stored[where]:
            verdict.problems.append(
                f"text: streamed {len(text)} chars, {where} {len(stored[where] or '')}, differ"
            )
    if stored["content_hash"] != hashlib.sha256(text.encode()).hexdigest():
        verdict.problems.append("content hash differs from the streamed text's")


def stored_streams(cluster: Cluster, ids: list[str]) -> dict[str, dict[str, Any]]:
    """Each stream as SQL and the log have it."""
    engine = sa.create_engine(normalize_url(cluster.pg.url))
    query = sa.text(
        "SELECT s.id, s.status, s.last_seq, s.content_hash, s.attempt, s.error_code, "
        "s.error_message, m.content, m.status FROM streams s JOIN messages m ON m.id = s.message_id"
    )
    try:
        with engine.connect() as conn:
            rows = {r[0]: r for r in conn.execute(query)}
    finally:
        engine.dispose()
    client = cluster.redis()
    try:
        states = {sid: client.hgetall(f"relay:{{{sid}}}:state") for sid in ids}
    finally:
        client.close()
    return {
        sid: {
            "status": rows[sid][1],
            "last_seq": rows[sid][2],
            "content_hash": rows[sid][3],
            "attempt": rows[sid][4],
            "error": (rows[sid][5], rows[sid][6]),
            "content": rows[sid][7],
            "message_status": rows[sid][8],
            "log_status": states[sid].get("status"),
            "log_attempt": states[sid].get("attempt"),
            "log_seq": int(states[sid].get("seq", 0)),
        }
        for sid in ids
    }


def non_terminal(cluster: Cluster) -> dict[str, list[str]]:
    """Every stream still queued or running, in SQL and in the log (not only this run's)."""
    engine = sa.create_engine(normalize_url(cluster.pg.url))
    try:
        with engine.connect() as conn:
            sql = [
                r[0]
                for r in conn.execute(
                    sa.text("SELECT id FROM streams WHERE status IN ('queued', 'running')")
                )
            ]
    finally:
        engine.dispose()
    client = cluster.redis()
    try:
        log = [
            key.split("{", 1)[1].split("}", 1)[0]
            for key in client.scan_iter("relay:{*}:state", count=1000)
            if client.hget(key, "status") in {"queued", "running"}
        ]
    finally:
        client.close()
    return {"sql": sql, "log": log}


# Once every viewer is done, how long the sweeper has to seal what the faults left open: a
# terminal event lost in a Sentinel failover (written to the old master, not yet to the
# replica) leaves the log's state "running" while SQL has the end, and viewers have it from
# SQL; the sweeper writes it to the log once the writer's heartbeat is stale (3 s here).
SEAL_WAIT_S = 15.0


def non_terminal_settled(cluster: Cluster) -> tuple[dict[str, list[str]], int]:
    """The streams still queued or running once the sweeper has had SEAL_WAIT_S to seal
    them, and how many there were when the viewers were done."""
    first = leftover = non_terminal(cluster)
    deadline = time.monotonic() + SEAL_WAIT_S
    while (leftover["sql"] or leftover["log"]) and time.monotonic() < deadline:
        time.sleep(0.5)
        leftover = non_terminal(cluster)
    return leftover, len(set(first["sql"]) | set(first["log"]))


# -- figures ----------------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def longest_gap(times: list[float], start: float, end: float) -> tuple[float, float] | None:
    """The longest pause between consecutive events that ended in (start, end]: (its length,
    when it began). A pause still going on when the next fault hits counts for that one."""
    gaps = [(b - a, a) for a, b in itertools.pairwise(times) if start < b <= end]
    return max(gaps) if gaps else None


def spread(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(quantile(values, 0.5), 2),
        "p99": round(quantile(values, 0.99), 2),
        "max": round(max(values, default=0.0), 2),
    }


def fault_figures(fault: Fault, end: float, viewers: list[Viewer], t0: float) -> dict[str, Any]:
    """What the viewers of the streams a fault hit saw until the next fault: their longest
    pause, when each moved again after the fault was over, and the connections that ended
    (other than by the viewer's choice or at the end of the answer) with how they ended."""
    hit = [v for v in viewers if v.stream_id in set(fault.affected)]
    gaps = {v.stream_id: g for v in hit if (g := longest_gap(v.times(), fault.start, end))}
    recoveries = [
        next(t for t in v.times() if t > fault.restored) - fault.start
        for v in hit
        if v.received and v.received[-1][0] > fault.restored
    ]
    ends = [
        c for v in viewers for c in v.conns
        if fault.start <= (c.end or math.inf) < end and not (c.voluntary or c.last)
    ]  # fmt: skip
    slowest = max(gaps.items(), key=lambda item: item[1][0], default=None)
    return {
        "fault": fault.name,
        "at_s": round(fault.start - t0, 2),
        "outage_s": round(fault.restored - fault.start, 2),
        "live_streams": fault.live,
        "affected_streams": len(hit),
        "pause_s": spread([g for g, _ in gaps.values()]),
        "paused_over_1s": sum(1 for g, _ in gaps.values() if g > 1.0),
        "recovered_s": round(max(recoveries, default=0.0), 2),
        "reconnects": len(ends),
        "codes": dict(Counter(c.outcome for c in ends).most_common()),
        "slowest": slowest
        and {
            "stream": slowest[0],
            "pause_s": round(slowest[1][0], 2),
            "from_s": round(slowest[1][1] - fault.start, 2),
        },
        "note": fault.note,
    }


def baseline_figures(viewers: list[Viewer], start: float, end: float) -> dict[str, Any]:
    """The same pause figures with no fault: what the random drops alone cost."""
    pauses = [g[0] for v in viewers if (g := longest_gap(v.times(), start, end))]
    return {"window_s": round(end - start, 2), "pause_s": spread(pauses)}


def pace_figures(viewers: list[Viewer], since: float) -> dict[str, Any]:
    """How fast the answers were written once every fault was over: the chunks each viewer
    received after ``since`` per second until its last one (the size's rate is what was
    asked), and each answer's span from its first chunk to its last, faults and all. Below
    the rate, answers were written slower than asked: slow, not frozen."""
    paces, spans = [], []
    for v in viewers:
        times = [t for t, e in v.received if e["type"] == "chunk"]
        if not times:
            continue
        spans.append(times[-1] - times[0])
        after = [t for t in times if t > since]
        if len(after) > 1:
            paces.append((len(after) - 1) / (after[-1] - after[0]))
    return {"chunks_per_s": spread(paces), "answer_s": spread(spans)}


def log_excerpt(logs: dict[str, str], stream_id: str, lines: int = 8) -> list[str]:
    """The worker log lines about one stream, and errors near them, for a failure report."""
    found: list[str] = []
    for name, text in logs.items():
        rows = text.splitlines()
        for i, row in enumerate(rows):
            if stream_id in row:
                found.append(f"{name}: {row.strip()[:300]}")
                found += [
                    f"{name}: {r.strip()[:300]}"
                    for r in rows[i + 1 : i + 4]
                    if "Error" in r or "Traceback" in r
                ]
    return found[-lines:]


def figures(
    size: ChaosSize,
    viewers: list[Viewer],
    faults: list[Fault],
    started: float,
    cluster: Cluster,
) -> dict[str, Any]:
    ids = [v.stream_id for v in viewers]
    stored = stored_streams(cluster, ids)
    verdicts = [
        check_stream(v, {**stored[v.stream_id], "api_content": v.api_content}) for v in viewers
    ]
    leftover, open_at_end = non_terminal_settled(cluster)
    logs = cluster.worker_logs()
    failures = [
        {
            "stream": verdict.stream_id,
            "problems": verdict.problems,
            "error": stored[verdict.stream_id]["error"],
            "attempt": stored[verdict.stream_id]["attempt"],
            "log": log_excerpt(logs, verdict.stream_id),
        }
        for verdict in verdicts
        if verdict.problems
    ]
    ends = [
        *(f.start for f in faults[1:]),
        max((v.times()[-1] for v in viewers if v.received), default=started),
    ]
    fault_rows = [
        fault_figures(f, end, viewers, started) for f, end in zip(faults, ends, strict=False)
    ]
    # Every fault over: the last one's start, plus the time its streams took to move again.
    settled = max((started + r["at_s"] + r["recovered_s"] for r in fault_rows), default=started)
    conns = [c for v in viewers for c in v.conns]
    first_event = min((v.times()[0] for v in viewers if v.received), default=started)
    outcomes = Counter(stored[sid]["status"] for sid in ids)
    return {
        "size": {
            "streams": size.streams,
            "chunks_per_second": size.rate,
            "answer_s": size.answer_s,
            "words": size.words,
            "workers": size.workers,
            "web_processes": 2,
            "cpus": os.cpu_count(),
        },
        "streams": len(viewers),
        "chunks": sum(1 for v in viewers for _, e in v.received if e["type"] == "chunk"),
        "events_received": sum(len(v.received) for v in viewers),
        "lost": sum(v.lost for v in verdicts),
        "duplicated": sum(v.duplicated for v in verdicts),
        "mismatched": sum(
            1
            for v in verdicts
            if any(p.startswith(("text", "content", "SQL's last seq")) for p in v.problems)
        ),
        "not_done": sum(
            1 for v in verdicts if any(p.startswith(("ended", "frozen")) for p in v.problems)
        ),
        "frozen": sum(1 for v in viewers if not v.finished),
        "non_terminal": len(set(leftover["sql"]) | set(leftover["log"])),
        "sealed_by_sweeper": open_at_end - len(set(leftover["sql"]) | set(leftover["log"])),
        "outcomes": dict(outcomes),
        "attempts": dict(sorted(Counter(stored[sid]["attempt"] for sid in ids).items())),
        "connections": len(conns),
        "dropped_by_viewers": sum(1 for c in conns if c.voluntary),
        "connection_outcomes": dict(Counter(c.outcome for c in conns).most_common()),
        "server_errors": sum(1 for c in conns if server_error(c.outcome)),
        "baseline": baseline_figures(viewers, first_event, faults[0].start if faults else started),
        "pace": pace_figures(viewers, settled),
        "faults": fault_rows,
        "failures": failures[:20],
        "failed_streams": len(failures),
    }


def server_error(outcome: str) -> bool:
    """A connection the server refused or closed for its own fault: an HTTP 5xx other than a
    503 (an outage's retryable answer), or a WebSocket 1011. A fault must never cause one."""
    kind, _, code = outcome.partition(" ")
    return (kind == "http" and code.startswith("5") and code != "503") or outcome == "ws 1011"


def run_chaos(size: ChaosSize, tmpdir: Path, timeout: float | None = None) -> dict[str, Any]:
    """Run one chaos test of ``size`` in ``tmpdir``; every process is stopped at the end."""
    cluster = Cluster(size, tmpdir)
    limit = timeout or size.answer_s + 240.0
    began = time.monotonic()
    try:
        cluster.start()
        viewers, faults, started = asyncio.run(stream_all(cluster, size, limit))
        result = figures(size, viewers, faults, started, cluster)
        result["faults_expected"] = 5
        result["duration_s"] = round(time.monotonic() - began, 1)
        result["logs"] = str(cluster.logdir)
        return result
    finally:
        cluster.close()


@contextlib.contextmanager
def scratch_dir(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="relay-chaos-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=300)
    parser.add_argument("--rate", type=float, default=2.0, help="chunks per second per answer")
    parser.add_argument("--answer-s", type=float, default=120.0, help="seconds per answer")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument(
        "--redis", choices=["single", "sentinel"], default="single",
        help="sentinel: a master, a replica and three sentinels; the Redis fault is a failover",
    )  # fmt: skip
    parser.add_argument("--keep", action="store_true", help="keep the logs directory")
    args = parser.parse_args(argv)
    size = ChaosSize(
        args.streams, args.rate, args.answer_s, args.workers, seed=args.seed, redis=args.redis
    )
    with scratch_dir(args.keep) as tmpdir:
        result = run_chaos(size, tmpdir)
    print(json.dumps(result, indent=2))
    ok = not (
        result["lost"]
        or result["duplicated"]
        or result["failed_streams"]
        or result["non_terminal"]
        or result["server_errors"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
