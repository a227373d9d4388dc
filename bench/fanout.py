"""Fan-out benchmark: N WebSocket viewers on one stream served by one gunicorn (gevent)
process; a producer appends chunks at a fixed rate; we measure append-to-receive latency."""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
import requests
from websockets.asyncio.client import connect

from models.chunklog import ChunkLog
from models.db import make_engine, make_sessionmaker
from models.events import CHUNK, DONE, Event
from models.migrate import upgrade
from models.tables import Chat, Message, Stream
from ops.redis_server import free_port
from web.auth import create_api_user

ROOT = Path(__file__).resolve().parent.parent
CHUNKS = 200
RATE = 50.0  # chunks per second, faster than a real model


def _seed(database_url: str) -> tuple[str, str]:
    """A stream owned by an API user; returns (stream id, bearer token)."""
    sessions = make_sessionmaker(make_engine(database_url))
    with sessions() as db:
        uid, token = create_api_user(db, "bench")
        chat = Chat(user_id=uid, title="bench")
        db.add(chat)
        db.flush()
        message = Message(chat_id=chat.id, position=1, role="assistant", status="streaming")
        db.add(message)
        db.flush()
        stream = Stream(chat_id=chat.id, message_id=message.id, status="running")
        db.add(stream)
        db.commit()
        return stream.id, token


def _start_web(env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "gunicorn"), "--config", "gunicorn.conf.py",
         "--workers", "1", "--bind", f"127.0.0.1:{port}", "--access-logfile", "/dev/null",
         "web:create_app()"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                return proc
        except requests.RequestException:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("web server did not start")


async def _viewer(url: str, token: str, received: dict[int, float]) -> None:
    import json

    async with connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                       max_queue=None, open_timeout=60) as ws:  # fmt: skip
        async for raw in ws:
            event = json.loads(raw)
            received[event["seq"]] = time.perf_counter()


def _produce(url: str, sid: str, sent: dict[int, float]) -> None:
    log = ChunkLog(redis.Redis.from_url(url, decode_responses=True))
    claim = log.claim(sid, "bench", 60)
    for seq in range(1, CHUNKS + 1):
        sent[seq] = time.perf_counter()
        log.append(sid, claim.attempt, Event(seq, CHUNK, text="tok "))
        time.sleep(1 / RATE)
    sent[CHUNKS + 1] = time.perf_counter()
    log.append(sid, claim.attempt, Event(CHUNKS + 1, DONE, message_id="m"))


async def _round(viewers: int, ws_url: str, redis_url: str, sid: str, token: str) -> Any:
    received = [dict[int, float]() for _ in range(viewers)]
    started = time.perf_counter()
    tasks = [asyncio.create_task(_viewer(ws_url, token, r)) for r in received]
    await asyncio.sleep(0)
    # Give every viewer time to attach before the first chunk (attach cost measured apart).
    while sum(1 for t in tasks if not t.done()) and time.perf_counter() - started < 60:
        await asyncio.sleep(0.2)
        if time.perf_counter() - started > 2 + viewers / 200:
            break
    sent: dict[int, float] = {}
    await asyncio.to_thread(_produce, redis_url, sid, sent)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
    latencies = [(r[s] - sent[s]) * 1000 for r in received for s in sent if s in r]
    complete = sum(1 for r in received if len(r) == CHUNKS + 1)
    return latencies, complete


def run(redis_url: str, tmp: Path) -> dict[str, Any]:
    database_url = f"sqlite:///{tmp / 'bench.db'}"
    upgrade(database_url)
    port = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": database_url,
           "SECRET_KEY": "bench", "RELAY_VAR_DIR": str(tmp)}  # fmt: skip
    web = _start_web(env, port)
    results = []
    try:
        for viewers in (10, 200, 1000):
            sid, token = _seed(database_url)
            ChunkLog(redis.Redis.from_url(redis_url)).init(sid)
            url = f"ws://127.0.0.1:{port}/api/v1/streams/{sid}/ws"
            latencies, complete = asyncio.run(_round(viewers, url, redis_url, sid, token))
            q = statistics.quantiles(latencies, n=100)
            results.append({
                "viewers": viewers, "chunks": CHUNKS, "rate_per_s": RATE,
                "viewers_complete": complete, "deliveries": len(latencies),
                "latency_ms": {"p50": round(q[49], 2), "p95": round(q[94], 2),
                               "p99": round(q[98], 2), "max": round(max(latencies), 2)},
            })  # fmt: skip
    finally:
        web.terminate()
        web.wait(30)
    return {"web_processes": 1, "rounds": results}
