"""Operations against real processes: the Celery CLI (revoke, inspect, streams ...), worker
crashes (SIGKILL) and graceful shutdown (SIGTERM) of workers and web servers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
from celery import Celery

from ops.redis_server import EmbeddedRedis, free_port
from tests.client import Attach, Client, assert_coherent, read_rest, wait_for
from tests.conftest import Stack, migrated_database, stack_env
from tests.procs import BIN, ROOT, Proc, start_web
from workers.celery_app import CONTINUE_QUEUE

LONG = "[demo:words=300]"


def celery(stack: Stack, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "celery"), "-A", "workers", *args],
        env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=check,
    )  # fmt: skip


def celery_all(stack: Stack, *commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Several CLI commands at once (each starts Celery: seconds), their results in order."""
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda args: celery(stack, *args), commands))


def writer_of(stack: Stack, sid: str, workers: list[Proc]) -> Proc:
    """The worker process currently writing the stream (from the log's state)."""
    name = wait_for(lambda: stack.redis().hget(f"relay:{{{sid}}}:state", "worker"), timeout=20)
    pid = int(name.rsplit(":", 1)[1])
    return next(w for w in workers if w.pid == pid)


# -- admin commands ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["control", "revoke"],
        # revoke(..., terminate=True) from the CLI; the threads pool cannot kill a thread, so
        # the revoke it records is honoured cooperatively, with the same clean result.
        ["control", "terminate", "SIGTERM"],
    ],
)
def test_celery_revoke_cancels_cooperatively(isolated_stack: Stack, command: list[str]) -> None:
    stack = isolated_stack
    stack.start_worker("w1")
    client = stack.client()
    posted = client.post_chat(f"Revoke me {LONG}")
    sid = posted["streamId"]
    seen = client.attach(sid, until=lambda a: len(a.events) >= 10)
    celery(stack, *command, sid)
    events = read_rest(client, sid, seen)
    assert events[-1]["type"] == "cancelled"
    assert_coherent(client, posted["chatId"], events)
    answer = client.answer(posted["chatId"])
    assert answer["status"] == "cancelled" and answer["content"]
    assert client.stream(sid)["status"] == "cancelled"


def test_revoke_of_a_queued_task_cancels_its_stream(isolated_stack: Stack) -> None:
    stack = isolated_stack
    stack.start_worker("w1")
    client = stack.client()
    # Fill the worker's 8 slots so the next task waits in the queue.
    busy = [client.post_chat(f"busy {i} [demo:words=2000] [demo:rate=20]") for i in range(8)]
    for b in busy:
        client.wait_status(b["streamId"], {"running"})
    posted = client.post_chat(f"Never started {LONG}")
    sid = posted["streamId"]
    celery(stack, "control", "revoke", sid)
    for b in busy:  # free the slots: the worker now takes the revoked task and drops it
        client.request("POST", f"/api/v1/streams/{b['streamId']}/cancel")
    got = client.attach(sid)
    assert [e["type"] for e in got.events] == ["cancelled"]
    assert client.answer(posted["chatId"])["status"] == "cancelled"


def test_inspect_active_shows_generations_by_stream_id(isolated_stack: Stack) -> None:
    stack = isolated_stack
    stack.start_worker("w1")
    client = stack.client()
    posted = client.post_chat(f"Inspect me {LONG}")
    client.attach(posted["streamId"], until=lambda a: len(a.events) >= 3)
    out = celery(stack, "inspect", "active", "--json").stdout
    active = [task for tasks in json.loads(out).values() for task in tasks]
    assert [(t["id"], t["args"]) for t in active] == [(posted["streamId"], [posted["streamId"]])]
    client.request("POST", f"/api/v1/streams/{posted['streamId']}/cancel")


def test_streams_commands(isolated_stack: Stack) -> None:
    stack = isolated_stack
    stack.start_worker("w1")
    client = stack.client()
    # Long enough (~100 s) to outlast two rounds of CLI runs before the cancel (each starts
    # Celery: seconds, and a busy CI machine took more than 12 s for them); the retry's
    # continuation goes fast.
    posted = client.post_chat("Admin me [demo:words=3000] [demo:continue-rate=400]")
    sid = posted["streamId"]
    seen = client.attach(sid, until=lambda a: len(a.events) >= 5)
    listed, shown, refused = celery_all(
        stack, ["streams", "list", "--status", "running"], ["streams", "show", sid],
        ["streams", "retry", sid],
    )  # fmt: skip
    assert listed.returncode == 0 and sid in listed.stdout and "running" in listed.stdout
    assert shown.returncode == 0, shown.stderr
    record = json.loads(shown.stdout)
    assert record["status"] == "running" and record["taskId"] == sid and record["worker"]
    # Retrying a running stream is an illegal transition, with a clear message.
    assert refused.returncode == 2 and "only failed or cancelled" in refused.stderr
    out = celery(stack, "streams", "cancel", sid, check=True).stdout
    assert "cancel requested" in out
    first = read_rest(client, sid, seen)
    assert first[-1]["type"] == "cancelled"
    partial = client.answer(posted["chatId"])["content"]
    # Retry continues the same stream ID after a "resumed" event; viewers see it continue.
    out = celery(stack, "streams", "retry", sid, check=True).stdout
    assert "retrying" in out
    rest = client.attach(sid, after=first[-1]["seq"])
    assert rest.events[0] == {"type": "resumed", "seq": first[-1]["seq"] + 1, "attempt": 2}
    assert rest.last["type"] == "done"
    events = first + rest.events
    assert_coherent(client, posted["chatId"], events)
    final = client.answer(posted["chatId"])
    assert final["status"] == "complete" and final["content"].startswith(partial)
    # A fresh viewer replays the whole history: chunks, cancelled, resumed, chunks, done.
    assert client.attach(sid).events == events
    listed, *missing, done = celery_all(
        stack, ["streams", "list"],
        *(["streams", command, "no-such-stream"] for command in ("show", "cancel", "retry")),
        ["streams", "cancel", sid],
    )  # fmt: skip
    assert listed.returncode == 0 and listed.stdout.count(sid) == 1
    for refusal in missing:
        assert refusal.returncode == 1 and "no stream 'no-such-stream'" in refusal.stderr
    assert done.returncode == 2 and "already ended" in done.stdout


# -- worker crashes ---------------------------------------------------------------------------


def test_sigkill_of_the_writing_worker_with_another_running(isolated_stack: Stack) -> None:
    stack = isolated_stack
    workers = [stack.start_worker("w1"), stack.start_worker("w2")]
    client = stack.client()
    posted = client.post_chat(f"Crash test {LONG}")
    sid = posted["streamId"]
    seen = client.attach(sid, until=lambda a: len(a.events) >= 20)
    victim = writer_of(stack, sid, workers)
    victim.kill()
    events = read_rest(client, sid, seen)
    assert events[-1]["type"] == "done"
    assert_coherent(client, posted["chatId"], events)
    survivor = next(w for w in workers if w is not victim)
    assert f"stream={sid} attempt=2" in survivor.output()
    assert client.stream(sid)["attempt"] == 2


def test_sigkill_of_the_only_worker_then_a_new_one(isolated_stack: Stack) -> None:
    stack = isolated_stack
    first = stack.start_worker("w1")
    client = stack.client()
    posted = client.post_chat(f"Lonely crash {LONG}")
    sid = posted["streamId"]
    seen = client.attach(sid, until=lambda a: len(a.events) >= 20)
    first.kill()
    stack.start_worker("w2")
    events = read_rest(client, sid, seen)
    assert events[-1]["type"] == "done"
    assert_coherent(client, posted["chatId"], events)


@pytest.mark.stack_env(RELAY_FAULT_PAUSE="before-terminal=60")
def test_sigkill_during_the_final_write(isolated_stack: Stack) -> None:
    stack = isolated_stack
    worker = stack.start_worker("w1")
    client = stack.client()
    posted = client.post_chat("Die at the very end [demo:words=20]")
    sid = posted["streamId"]
    # The answer is stored in SQL; the worker now pauses before writing the terminal event.
    wait_for(lambda: "fault point before-terminal" in worker.output(), timeout=30)
    assert client.stream(sid)["status"] == "done"  # SQL has the end: it has ended
    seen = client.attach(sid, until=lambda a: bool(a.events) and a.events[-1]["seq"] >= 3)
    worker.kill()
    stack.env.pop("RELAY_FAULT_PAUSE")
    stack.start_worker("w2")  # its sweeper writes the missing end from SQL
    events = read_rest(client, sid, seen)
    assert events[-1]["type"] == "done"
    assert_coherent(client, posted["chatId"], events)
    assert client.stream(sid)["status"] == "done"


def test_a_redelivered_copy_of_a_live_stream_does_nothing(isolated_stack: Stack) -> None:
    stack = isolated_stack
    worker = stack.start_worker("w1")
    client = stack.client()
    posted = client.post_chat(f"Redelivery {LONG}")
    sid = posted["streamId"]
    seen = client.attach(sid, until=lambda a: len(a.events) >= 5)
    # What the broker does after a visibility timeout: deliver the same task again.
    subprocess.run(
        [str(BIN / "python"), "-c",
         f"from workers import app; app.send_task('relay.generate', args=['{sid}'], "
         f"task_id='{sid}')"],
        env=stack.env, cwd=ROOT, check=True, timeout=60,
    )  # fmt: skip
    wait_for(lambda: f"stream={sid} task={sid} not started: busy" in worker.output(), 20)
    events = read_rest(client, sid, seen)
    assert events[-1]["type"] == "done"
    assert_coherent(client, posted["chatId"], events)
    assert client.stream(sid)["attempt"] == 1


def test_failed_and_cancelled_answers_are_failures_in_celerys_events(
    isolated_stack: Stack,
) -> None:
    """Flower and `celery events` read task events: an answer that ended failed or
    cancelled must not show as a success there."""
    stack = isolated_stack
    stack.start_worker("w1")
    monitor = Celery(broker=stack.env["REDIS_URL"])
    assert monitor.control.enable_events(reply=True, timeout=10)  # the worker confirmed
    seen: list[dict[str, Any]] = []
    with monitor.connection() as conn:
        receiver = monitor.events.Receiver(conn, handlers={"*": seen.append})
        listening = threading.Thread(
            target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False), daemon=True
        )
        listening.start()
        try:
            client = stack.client()
            failed = client.post_chat("Fail please [demo:fail-after=3]")["streamId"]
            done = client.post_chat("Be quick [demo:words=5]")["streamId"]
            cancelled = client.post_chat(f"Stop me {LONG}")["streamId"]
            client.attach(cancelled, until=lambda a: len(a.events) >= 3)
            client.request("POST", f"/api/v1/streams/{cancelled}/cancel")

            def outcome(sid: str) -> dict[str, Any] | None:
                ends = ("task-failed", "task-succeeded")
                return next((e for e in seen if e.get("uuid") == sid and e["type"] in ends), None)

            wait_for(lambda: all(outcome(s) for s in (failed, done, cancelled)), timeout=60)
        finally:
            receiver.should_stop = True
    assert outcome(done)["type"] == "task-succeeded"  # type: ignore[index]
    assert outcome(failed)["type"] == "task-failed"  # type: ignore[index]
    assert "AnswerFailed" in outcome(failed)["exception"]  # type: ignore[index]
    assert outcome(cancelled)["type"] == "task-failed"  # type: ignore[index]
    assert "AnswerCancelled" in outcome(cancelled)["exception"]  # type: ignore[index]
    assert client.stream(failed)["status"] == "failed"
    assert client.stream(cancelled)["status"] == "cancelled"


# -- graceful shutdown -----------------------------------------------------------------------


def test_sigterm_hands_running_generations_to_another_worker(isolated_stack: Stack) -> None:
    stack = isolated_stack
    workers = [stack.start_worker("w1"), stack.start_worker("w2")]
    client = stack.client()
    posted = client.post_chat("Long goodbye [demo:words=600]")  # ~14 s: outlasts the hand-off
    sid = posted["streamId"]
    seen = client.attach(sid, until=lambda a: len(a.events) >= 10)
    leaving = writer_of(stack, sid, workers)
    leaving.popen.send_signal(signal.SIGTERM)
    leaving.popen.wait(30)  # exits after the 1 s grace, without waiting for the answer
    assert "handed back for another worker" in leaving.output()
    events = read_rest(client, sid, seen)
    assert events[-1]["type"] == "done"
    assert_coherent(client, posted["chatId"], events)


# Hundreds of new chats queued behind a hand-off (issue: "continued within 10 s even when
# hundreds of new chats are queued"). The stack's per-user limits are off (stack_env:
# RELAY_MAX_RUNNING_PER_USER=0, RELAY_POSTS_PER_MINUTE=0), so one user may queue them all.
QUEUED_CHATS = 300


def post_many(client: Client, messages: list[str], threads: int = 8) -> list[str]:
    """Post ``messages`` as ``client``'s user from a few connections at once; stream IDs."""
    local = threading.local()

    def post(message: str) -> str:
        if not hasattr(local, "client"):
            local.client = Client(client.base_url)
            local.client.http.cookies.update(client.http.cookies)
        return str(local.client.post_chat(message)["streamId"])

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(post, messages))


def test_a_handed_off_answer_goes_ahead_of_queued_chats(isolated_stack: Stack) -> None:
    """Continuations have a queue of their own that workers drain first: an answer handed
    back by a stopping worker is continued before the hundreds of chats that were queued
    before it; and while its copy waits in that queue, no sweep sends a second one."""
    stack = isolated_stack
    leaving = stack.start_worker("w1", concurrency=1)
    client = stack.client()
    # Long enough (~35 s) to be still running after the posts below on a busy machine; its
    # continuation goes fast (what it shows is which answer the next worker starts first).
    posted = client.post_chat("Hand me on [demo:words=1500] [demo:continue-rate=1000]")
    sid = posted["streamId"]
    seen = client.attach(sid, until=lambda a: len(a.events) >= 5)
    queued = post_many(client, [f"Waiting {i} [demo:words=20]" for i in range(QUEUED_CHATS)])
    assert len(set(queued)) == QUEUED_CHATS
    assert client.stream(sid)["status"] == "running"  # the hand-off below has work to hand
    leaving.popen.send_signal(signal.SIGTERM)
    leaving.popen.wait(30)
    said = leaving.output()
    assert "handed back for another worker" in said
    assert not any(f"stream={q} " in said for q in queued)  # none started, none passed on
    # No worker runs now: the hand-off's copy waits in the continuation queue, the only one.
    broker = redis.Redis.from_url(stack.env["REDIS_URL"])
    try:
        assert broker.llen(CONTINUE_QUEUE) == 1
        # A sweep while it waits (the writer's heartbeat was made stale at the hand-off)
        # must not send a second copy: the hand-off marked its copy as on its way.
        swept = celery(stack, "streams", "sweep", check=True).stdout
        assert "requeued 0," in swept, swept
        assert broker.llen(CONTINUE_QUEUE) == 1
    finally:
        broker.close()
    arriving = stack.start_worker("w2", concurrency=1)

    def first_started() -> str | None:
        started = re.search(r"stream=(\S+) attempt=\d+ task=", arriving.output())
        return started[1] if started else None

    first = wait_for(first_started, timeout=60)
    assert first == sid, f"the new worker started {first} before the handed-off answer"
    events = read_rest(client, sid, seen)
    assert events[-1]["type"] == "done"
    assert_coherent(client, posted["chatId"], events)
    out = arriving.output()
    continued_at = out.index(f"stream={sid} attempt=2")
    assert not any(f"stream={q} attempt=1" in out[:continued_at] for q in queued), out
    # One copy, one new attempt: no re-send by the new worker's sweeper either.
    assert f"stream={sid} writer gone" not in out
    assert f"stream={sid} task={sid} not started" not in out
    assert client.stream(sid)["attempt"] == 2


def test_sigterm_to_web_closes_sockets_with_going_away(isolated_stack: Stack) -> None:
    stack = isolated_stack
    stack.start_worker("w1")
    web, port = stack.start_web()
    client = stack.client(f"http://127.0.0.1:{port}")
    posted = client.post_chat(f"Web going away {LONG}")
    got: list[Attach] = []

    def view() -> None:
        got.append(client.attach(posted["streamId"]))

    viewer = threading.Thread(target=view)
    viewer.start()
    wait_for(lambda: client.stream(posted["streamId"])["lastSeq"] >= 5, timeout=20)
    os.kill(web.pid, signal.SIGTERM)
    viewer.join(30)
    assert got and got[0].close_code == 1001 and "reconnect" in got[0].close_reason
    assert got[0].events and got[0].last["type"] == "chunk"
    web.popen.wait(30)
    # The client re-attaches on another web process and completes the answer.
    other = stack.client()
    other.http.cookies = client.http.cookies
    events = read_rest(other, posted["streamId"], got[0])
    assert_coherent(other, posted["chatId"], events)


# -- observability ----------------------------------------------------------------------------


def test_readyz_fails_when_redis_is_gone_and_worker_metrics(
    isolated_stack: Stack, tmp_path: Path
) -> None:
    stack = isolated_stack
    port = free_port()
    stack.env["RELAY_WORKER_METRICS_PORT"] = str(port)
    stack.start_worker("w1")
    client = stack.client()
    posted = client.post_chat("metrics [demo:words=20]")
    assert client.attach(posted["streamId"]).last["type"] == "done"

    # The worker counts the answer once its terminal event is in the log, which a viewer
    # can read first: the count comes right after, not necessarily before.
    def counted() -> str:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        return text if 'relay_generations_total{outcome="done"} 1.0' in text else ""

    text = wait_for(counted, timeout=10)
    assert "relay_time_to_first_chunk_seconds_count 1.0" in text
    assert "relay_chunks_appended_total" in text
    # A web process pointed at a Redis that is not there is alive but not ready.
    dead = {**stack.env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    web = start_web(dead, (web_port := free_port()), tmp_path)
    try:
        resp = requests.get(f"http://127.0.0.1:{web_port}/readyz", timeout=30)
        assert resp.status_code == 503
        assert resp.json()["checks"]["redis"].startswith("error")
        assert resp.json()["checks"]["database"] == "ok"
        # Requests that need Redis get a clear, retryable 503, never a 500.
        cut_off = stack.client(f"http://127.0.0.1:{web_port}")
        cut_off.http.cookies = client.http.cookies
        resp = cut_off.request("GET", f"/api/v1/streams/{posted['streamId']}")
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "service_unavailable"
        assert "Redis" in resp.json()["error"]["message"]
        got = cut_off.attach(posted["streamId"])
        assert got.events == [] and got.close_code == 1013
        resp = cut_off.request("POST", "/api/v1/chat", json={"message": "hello?"})
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "broker_unavailable"
        # The question is kept, with a failed answer saying why (the user can send it again).
        chats = [c["id"] for c in cut_off.get_json("/api/v1/chats")["chats"]]
        assert len(chats) == 2 and posted["chatId"] in chats
        failed = cut_off.answer(next(c for c in chats if c != posted["chatId"]))
        assert failed["status"] == "failed"
        assert failed["error"]["code"] == "broker_unavailable"
        # Each failed request is one line of the log, saying which and why: an outage
        # fails every request, and a traceback for each would bury the log.
        output = web.output()
        line = f"backend unavailable: GET /api/v1/streams/{posted['streamId']}: ConnectionError"
        assert line in output, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
    finally:
        web.stop()


def test_readyz_checks_a_broker_of_its_own(isolated_stack: Stack, tmp_path: Path) -> None:
    """With the task queue on a Redis of its own (CELERY_BROKER_URL), a web process whose
    broker is gone is not ready, and says which check failed; its logs' Redis is fine."""
    stack = isolated_stack
    ready = requests.get(f"{stack.base_url}/readyz", timeout=30)
    assert ready.status_code == 200 and "broker" not in ready.json()["checks"]  # one Redis
    broker = EmbeddedRedis(tmp_path / "broker").start()
    web = None
    try:
        env = {**stack.env, "CELERY_BROKER_URL": broker.url}
        web = start_web(env, (port := free_port()), tmp_path)
        resp = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=30)
        assert resp.status_code == 200, resp.text
        assert resp.json()["checks"] == {"redis": "ok", "database": "ok", "broker": "ok"}
        broker.stop()
        resp = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=30)
        assert resp.status_code == 503, resp.text
        checks = resp.json()["checks"]
        assert checks["broker"].startswith("error") and checks["redis"] == "ok", checks
    finally:
        if web is not None:
            web.stop()
        broker.stop()


def test_two_web_processes_and_two_workers(isolated_stack: Stack) -> None:
    """Streams spread over two workers; every client attaches to one web process, drops,
    and the other web process serves its re-attach."""
    stack = isolated_stack
    workers = [stack.start_worker("w1"), stack.start_worker("w2")]
    _, port_b = stack.start_web()
    web_a = stack.client()
    posted = [web_a.post_chat(f"multi {i} [demo:words=120]") for i in range(6)]
    web_b = stack.client(f"http://127.0.0.1:{port_b}")
    web_b.http.cookies = web_a.http.cookies
    for p in posted:
        first = web_a.attach(p["streamId"], until=lambda a: len(a.events) >= 5)
        rest = web_b.attach(p["streamId"], after=first.last["seq"])
        events = first.events + rest.events
        assert events[-1]["type"] == "done"
        assert_coherent(web_a, p["chatId"], events)
    names = {stack.redis().hget(f"relay:{{{p['streamId']}}}:state", "worker") for p in posted}
    assert {n.rsplit(":", 1)[1] for n in names} == {str(w.pid) for w in workers}


@pytest.mark.stack_env(RELAY_GENERATOR="no-such-generator")
def test_a_misconfigured_worker_refuses_to_start(isolated_stack: Stack) -> None:
    with pytest.raises(RuntimeError) as info:
        isolated_stack.start_worker("w1")
    assert "unknown generator 'no-such-generator'" in str(info.value)


@contextmanager
def own_redis_stack(tmp_path: Path, **extra: str) -> Iterator[tuple[Stack, EmbeddedRedis]]:
    """A web process and a worker on a Redis of their own that keeps its data across a
    restart (append-only file), so a test can stop and start it."""
    server = EmbeddedRedis(tmp_path / "redis", persistent=True).start()
    try:
        with migrated_database("sqlite", tmp_path) as database_url:
            env = {**stack_env(server.url, database_url), **extra}
            port = free_port()
            stack = Stack(env, tmp_path, port, start_web(env, port, tmp_path), [])
            try:
                stack.start_worker("w1")
                yield stack, server
            finally:
                stack.stop()
    finally:
        server.stop()


def test_a_redis_restart_mid_answer_loses_nothing(tmp_path: Path) -> None:
    """Redis stopped and started again on the same data while an answer streams: the writer
    reads back what its lost appends did and carries on, so the answer ends done, gapless,
    with the stored text equal to the streamed one."""
    with own_redis_stack(tmp_path) as (stack, server):
        client = stack.client()
        posted = client.post_chat(f"Through a Redis restart {LONG}")
        sid = posted["streamId"]
        seen = client.attach(sid, until=lambda a: len(a.events) >= 10)
        server.stop()  # SIGTERM: Redis writes its append-only file and exits
        time.sleep(2)  # the outage: the generation goes on, its appends wait
        server.start()
        events = read_rest(client, sid, seen)
        assert events[-1]["type"] == "done"
        assert_coherent(client, posted["chatId"], events)
        assert client.stream(sid)["status"] == "done"
        worker = stack.extra[0]
        assert worker.alive()
        assert "reading what it has" in worker.output()  # it did meet the outage


def _past_the_budget(client: Client, server: EmbeddedRedis) -> tuple[dict[str, Any], Attach]:
    """Post a long answer and stop Redis for longer than RELAY_BACKEND_BUDGET_S (1 s) while
    it streams; Redis is back when this returns. The chat and what a viewer saw up to the
    answer's end (read again after the outage)."""
    posted = client.post_chat(f"Past the budget {LONG}")
    sid = posted["streamId"]
    seen = client.attach(sid, until=lambda a: len(a.events) >= 10)
    server.stop()
    time.sleep(4)  # longer than the budget
    server.start()
    return posted, Attach(read_rest(client, sid, seen))


def test_an_outage_past_the_budget_ends_the_answer_backend_unavailable(tmp_path: Path) -> None:
    with own_redis_stack(tmp_path, RELAY_BACKEND_BUDGET_S="1") as (stack, server):
        client = stack.client()
        posted, seen = _past_the_budget(client, server)
        events = seen.events
        assert events[-1]["type"] == "error"
        assert events[-1]["error"]["code"] == "backend_unavailable"
        assert_coherent(client, posted["chatId"], events)  # the text so far, stored
        assert client.stream(posted["streamId"])["status"] == "failed"


def test_streams_retry_continues_an_answer_ended_backend_unavailable(tmp_path: Path) -> None:
    """The rest of the promise: once the backend is back, `streams retry` continues the same
    stream after a `resumed` event; a viewer that re-attaches after the last seq it saw gets
    the rest without a gap or a duplicate, and the answer ends done, stored whole."""
    with own_redis_stack(tmp_path, RELAY_BACKEND_BUDGET_S="1") as (stack, server):
        client = stack.client()
        posted, seen = _past_the_budget(client, server)
        sid = posted["streamId"]
        failed_at = seen.last["seq"]
        assert seen.last["type"] == "error", seen.last
        assert seen.last["error"]["code"] == "backend_unavailable"
        partial = client.answer(posted["chatId"])
        assert partial["status"] == "failed" and partial["content"] == seen.text
        attempt = client.stream(sid)["attempt"]
        retried = celery(stack, "streams", "retry", sid)
        assert retried.returncode == 0, retried.stdout + retried.stderr
        said = re.search(rf"retrying as task ({sid}-retry\d+); the answer continues after seq "
                         rf"{failed_at + 1}$", retried.stdout.strip())  # fmt: skip
        assert said, retried.stdout
        rest = client.attach(sid, after=failed_at, timeout=60)
        assert rest.events, (rest.close_code, rest.close_reason)
        assert rest.events[0] == {"type": "resumed", "seq": failed_at + 1, "attempt": attempt + 1}
        events = read_rest(client, sid, Attach(seen.events + rest.events))
        assert [e["type"] for e in events].count("resumed") == 1
        assert events[-1]["type"] == "done"
        assert_coherent(client, posted["chatId"], events)  # no gap, no duplicate, all stored
        final = client.answer(posted["chatId"])
        assert final["status"] == "complete" and final["content"].startswith(seen.text)
        assert len(final["content"]) > len(seen.text)  # it did continue, not just end
        assert client.stream(sid)["status"] == "done"
        worker = stack.extra[0]
        assert f"stream={sid} attempt={attempt + 1} task={said[1]} from seq={failed_at + 1}" in (
            worker.output()
        )
        # A fresh viewer replays the whole history: chunks, error, resumed, chunks, done.
        assert client.attach(sid).events == events
