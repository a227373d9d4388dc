"""The multi-host rehearsal (issue 12), run by ``make rehearse``: two "hosts", each a network
namespace of its own (``ip netns``, a veth pair to the root namespace) running a web process and
a Celery worker, talking over their own addresses to the Redis servers of a third "host" (the
root namespace, at SERVICES on its loopback interface): one Redis for everything, or with
``--log-cluster`` a 3-master Redis Cluster for the logs beside the broker's Redis. Answers
are written by host A's worker and followed through host B's web process; then host A's link
goes down mid-stream (``ip link set ... down``: its packets go nowhere, nothing is closed), and
host B's worker must take the answers over and finish them with no gap and no duplicate. When
A's link comes back, its worker must not write another event into the answers it lost.

It needs root (namespaces and veth pairs), so it is a ``make`` target rather than part of
``make test``. Prints one JSON object; exits 1 when a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import requests

from models.keys import log_key, state_key
from models.redisconn import make_cluster
from ops.redis_server import free_port, redis_server_binary
from tests.client import Client, assert_coherent, read_rest, wait_for
from tests.cluster import Cluster
from tests.conftest import migrated_database
from tests.procs import BIN, START_TIMEOUT_S, Proc, stack_env

WEB_PORT = 8000
SERVICES = "10.231.0.1"  # the Redis servers' address, reached by every host through its link


@dataclass
class Host:
    """One network namespace with a veth pair: ``gateway`` is the root side's address (the
    namespace's default route), ``address`` the namespace's own."""

    name: str
    netns: str
    link: str  # the root side of the veth pair
    gateway: str
    address: str

    def run(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *args]

    def cut(self) -> None:
        sh("ip", "link", "set", self.link, "down")

    def mend(self) -> None:
        sh("ip", "link", "set", self.link, "up")


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


@contextmanager
def host(index: int, name: str) -> Iterator[Host]:
    tag = f"{os.getpid() % 100000}{name}"
    h = Host(
        name=name, netns=f"relay-{tag}", link=f"rl{tag}", gateway=f"10.231.{index}.1",
        address=f"10.231.{index}.2",
    )  # fmt: skip
    peer = f"rp{tag}"
    sh("ip", "netns", "add", h.netns)
    try:
        sh("ip", "link", "add", h.link, "type", "veth", "peer", "name", peer)
        sh("ip", "link", "set", peer, "netns", h.netns)
        sh("ip", "addr", "add", f"{h.gateway}/24", "dev", h.link)
        sh("ip", "link", "set", h.link, "up")
        for args in (
            ("ip", "addr", "add", f"{h.address}/24", "dev", peer),
            ("ip", "link", "set", peer, "up"),
            ("ip", "link", "set", "lo", "up"),
            ("ip", "route", "add", "default", "via", h.gateway),
        ):
            sh(*h.run(*args))
        yield h
    finally:
        subprocess.run(["ip", "link", "del", h.link], capture_output=True)
        subprocess.run(["ip", "netns", "del", h.netns], capture_output=True)


@contextmanager
def services_address() -> Iterator[str]:
    """SERVICES on the root namespace's loopback interface (reached through each host's link;
    the kernel here has no dummy interfaces)."""
    sh("ip", "addr", "add", f"{SERVICES}/32", "dev", "lo")
    try:
        yield SERVICES
    finally:
        subprocess.run(["ip", "addr", "del", f"{SERVICES}/32", "dev", "lo"], capture_output=True)


@contextmanager
def redis_on(address: str, workdir: Path) -> Iterator[int]:
    """A private redis-server listening on ``address`` (and loopback)."""
    port = free_port()
    proc = subprocess.Popen(
        [
            redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", address,
            "--protected-mode", "no", "--save", "", "--appendonly", "no",
            "--dir", str(workdir),
        ],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = redis.Redis(port=port)
        wait_for(lambda: _pings(client), timeout=10)
        yield port
    finally:
        proc.kill()
        proc.wait()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def start_web(h: Host, env: dict[str, str], logdir: Path) -> Proc:
    args = h.run(
        str(BIN / "gunicorn"), "--config", "gunicorn.conf.py", "--workers", "1",
        "--bind", f"0.0.0.0:{WEB_PORT}", "--graceful-timeout", "2", "web:create_app()",
    )  # fmt: skip
    proc = Proc(f"web-{h.name}", args, env, logdir)
    url = f"http://{h.address}:{WEB_PORT}/healthz"
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.alive():
        try:
            if requests.get(url, timeout=1).ok:
                return proc
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"web on host {h.name} did not start:\n{proc.output()}")


def start_worker(h: Host, env: dict[str, str], logdir: Path) -> Proc:
    args = h.run(
        str(BIN / "celery"), "-A", "workers", "worker", "--pool", "gevent", "--concurrency", "8",
        "--hostname", f"{h.name}@%h", "--loglevel", "INFO", "--without-mingle",
        "--without-gossip",
    )  # fmt: skip
    proc = Proc(f"worker-{h.name}", args, env, logdir)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.alive():
        if " ready." in proc.output():
            return proc
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"worker on host {h.name} did not start:\n{proc.output()}")


def on(worker: Proc, name: str | None) -> bool:
    """Whether the log state's ``worker`` field (``<host>:<pid>``) names this worker."""
    return bool(name) and str(name).rsplit(":", 1)[-1] == str(worker.pid)


def rehearse(workdir: Path, answers: int, words: int, log_cluster: bool) -> dict[str, Any]:
    checks: dict[str, bool] = {}
    with ExitStack() as stack:
        a = stack.enter_context(host(1, "a"))
        b = stack.enter_context(host(2, "b"))
        services = stack.enter_context(services_address())
        port = stack.enter_context(redis_on(services, workdir))
        db_url = stack.enter_context(migrated_database("sqlite", workdir))
        env = stack_env(f"redis://{services}:{port}/0", db_url)
        data: Any = redis.Redis(port=port, decode_responses=True)
        if log_cluster:
            cluster = Cluster(workdir / "cluster", address=services)
            stack.callback(cluster.stop)
            cluster.start()
            env["RELAY_LOG_REDIS_URL"] = cluster.url
            data = make_cluster(cluster.url, max_connections=20)
        procs: list[Proc] = []
        stack.callback(lambda: [p.kill() for p in procs])

        procs.append(start_web(b, env, workdir))
        procs.append(start_worker(a, env, workdir))
        client = Client(f"http://{b.address}:{WEB_PORT}")
        posted = [
            client.post_chat(f"Rehearsal {i} [demo:words={words}] [demo:rate=20]")
            for i in range(answers)
        ]
        sids = [p["streamId"] for p in posted]
        seen = {sid: client.attach(sid, until=lambda x: len(x.events) >= 10) for sid in sids}
        writers = {sid: data.hget(state_key(sid), "worker") for sid in sids}
        checks["host A writes every answer"] = all(on(procs[1], w) for w in writers.values())
        procs.append(start_worker(b, env, workdir))
        at_cut = {sid: data.xlen(log_key(sid)) for sid in sids}
        cut_at = time.monotonic()
        a.cut()
        events = {sid: read_rest(client, sid, seen[sid]) for sid in sids}
        finished_s = round(time.monotonic() - cut_at, 1)
        for p, sid in zip(posted, sids, strict=True):
            try:
                assert_coherent(client, p["chatId"], events[sid])
                coherent = events[sid][-1]["type"] == "done"
            except AssertionError:
                coherent = False
            checks[f"{sid}: one gapless answer, done, as stored"] = coherent
        taken = {sid: data.hget(state_key(sid), "worker") for sid in sids}
        checks["host B finished every answer"] = all(on(procs[2], w) for w in taken.values())
        lengths = {sid: data.xlen(log_key(sid)) for sid in sids}
        a.mend()
        time.sleep(8.0)  # host A's worker reconnects and finds its answers taken
        after = {sid: data.xlen(log_key(sid)) for sid in sids}
        checks["host A wrote nothing after its link came back"] = after == lengths
        return {
            "redis": "a cluster for the logs" if log_cluster else "one server",
            "answers": answers,
            "writers": {"before": writers, "after": taken},
            "chunks_before_cut": at_cut,
            "events": {sid: len(e) for sid, e in events.items()},
            "attempts": {sid: client.stream(sid)["attempt"] for sid in sids},
            "finished_s_after_cut": finished_s,
            "checks": checks,
            "ok": all(checks.values()),
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--answers", type=int, default=3)
    parser.add_argument("--words", type=int, default=300)
    parser.add_argument("--log-cluster", action="store_true", help="logs on a Redis Cluster")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print(json.dumps({"ok": False, "error": "needs root: ip netns and veth pairs"}))
        return 1
    with tempfile.TemporaryDirectory(prefix="relay-rehearsal-") as tmp:
        result = rehearse(Path(tmp), args.answers, args.words, args.log_cluster)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
