"""The multi-host rehearsal (issue 12), run by ``make rehearse``: two "hosts", each a network
namespace of its own (``ip netns``, a veth pair to the root namespace) running a web process and
a Celery worker, talking over their own addresses to the Redis servers of a third "host" (the
root namespace, at SERVICES on its loopback interface): one Redis for everything, or with
``--log-cluster`` a 3-master Redis Cluster for the logs beside the broker's Redis. Answers
are written by host A's worker and followed through host B's web process; then host A's link
goes down mid-stream (``ip link set ... down``: its packets go nowhere, nothing is closed), and
host B's worker must take the answers over and finish them with no gap and no duplicate. When
A's link comes back, its worker must not write another event into the answers it lost.

With ``--sentinel`` everything is on Redis under Sentinel, and the host cut off is the
master's: it runs on a host R of its own, its replica and three sentinels at SERVICES. The
sentinels promote the replica; every answer must go on to ``done`` with no gap and no
duplicate (whoever writes it), both workers must live through it, and when R's link comes
back its old master must be made a replica of the new one with no answer changed.

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
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis

from models.keys import log_key, state_key
from models.redisconn import make_cluster, make_redis
from ops.redis_server import EmbeddedRedis
from tests import procs
from tests.client import Client, assert_coherent, read_rest, wait_for
from tests.cluster import Cluster
from tests.conftest import migrated_database
from tests.procs import Proc, stack_env
from tests.sentinel import Sentinels

WEB_PORT = 8000
T = TypeVar("T")
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


def start_web(h: Host, env: dict[str, str], logdir: Path) -> Proc:
    return procs.start_web(
        env, WEB_PORT, logdir, prefix=h.run(), address=h.address, bind="0.0.0.0",
        name=f"web-{h.name}",
    )  # fmt: skip


def start_worker(h: Host, env: dict[str, str], logdir: Path) -> Proc:
    return procs.start_worker(env, logdir, h.name, prefix=h.run(), hostname=f"{h.name}@%h")


@contextmanager
def forwarding() -> Iterator[None]:
    """IPv4 forwarding in the root namespace (hosts reach a Redis on another host through
    it), as it was afterwards."""
    path = Path("/proc/sys/net/ipv4/ip_forward")
    before = path.read_text().strip()
    path.write_text("1")
    try:
        yield
    finally:
        path.write_text(before)


def ask(call: Callable[[], T]) -> T:
    """``call()`` with the rehearsal's own client, tried again while Redis is failing over
    (a pooled connection to a master that was cut off fails once, then a new one is made)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return call()
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _role(client: redis.Redis) -> bytes | None:
    try:
        return bytes(client.execute_command("ROLE")[0])
    except redis.RedisError:
        return None


def on(worker: Proc, name: str | None) -> bool:
    """Whether the log state's ``worker`` field (``<host>:<pid>``) names this worker."""
    return bool(name) and str(name).rsplit(":", 1)[-1] == str(worker.pid)


def rehearse(workdir: Path, answers: int, words: int, redis_kind: str) -> dict[str, Any]:
    """``redis_kind``: "one" server, a "cluster" for the logs, or "sentinel" (the host cut
    off is then the Redis master's, not a worker's)."""
    checks: dict[str, bool] = {}
    out: dict[str, Any] = {"redis": redis_kind, "answers": answers}
    with ExitStack() as stack:
        a = stack.enter_context(host(1, "a"))
        b = stack.enter_context(host(2, "b"))
        services = stack.enter_context(services_address())
        db_url = stack.enter_context(migrated_database("sqlite", workdir))
        sentinels: Sentinels | None = None
        if redis_kind == "sentinel":
            r = stack.enter_context(host(3, "r"))
            stack.enter_context(forwarding())
            sentinels = Sentinels(workdir / "sentinel", services, r.address, r.run())
            stack.callback(sentinels.stop)
            sentinels.start()
            env = stack_env(sentinels.url, db_url)
            data: Any = make_redis(sentinels.url, max_connections=20)
        else:
            server = EmbeddedRedis(workdir / "redis", address=services).start()
            stack.callback(server.stop)
            env = stack_env(f"redis://{services}:{server.port}/0", db_url)
            data = redis.Redis(host=services, port=server.port, decode_responses=True)
        if redis_kind == "cluster":
            cluster = Cluster(workdir / "cluster", address=services)
            stack.callback(cluster.stop)
            cluster.start()
            env["RELAY_LOG_REDIS_URL"] = cluster.url
            data = make_cluster(cluster.url, max_connections=20)
        running: list[Proc] = []
        stack.callback(lambda: [p.kill() for p in running])

        running.append(start_web(b, env, workdir))
        worker_a = start_worker(a, env, workdir)
        running.append(worker_a)
        client = Client(f"http://{b.address}:{WEB_PORT}")
        posted = [
            client.post_chat(f"Rehearsal {i} [demo:words={words}] [demo:rate=20]")
            for i in range(answers)
        ]
        sids = [p["streamId"] for p in posted]
        seen = {sid: client.attach(sid, until=lambda x: len(x.events) >= 10) for sid in sids}
        writers = {sid: data.hget(state_key(sid), "worker") for sid in sids}
        checks["host A writes every answer"] = all(on(worker_a, w) for w in writers.values())
        worker_b = start_worker(b, env, workdir)
        running.append(worker_b)
        out["chunks_before_cut"] = {sid: data.xlen(log_key(sid)) for sid in sids}
        cut = r if sentinels is not None else a
        first_master = sentinels.master_port() if sentinels is not None else None
        cut_at = time.monotonic()
        cut.cut()
        # When every answer's log grows again (taken over, or written to the new master).
        grows = {sid: ask(lambda s=sid: data.xlen(log_key(s))) + 1 for sid in sids}
        for sid in sids:
            wait_for(lambda s=sid: ask(lambda: data.xlen(log_key(s))) > grows[s], 120, 0.2)
        out["all_logs_grow_again_s_after_cut"] = round(time.monotonic() - cut_at, 1)
        events = {sid: read_rest(client, sid, seen[sid]) for sid in sids}
        out["finished_s_after_cut"] = round(time.monotonic() - cut_at, 1)
        for p, sid in zip(posted, sids, strict=True):
            try:
                assert_coherent(client, p["chatId"], events[sid])
                coherent = events[sid][-1]["type"] == "done"
            except AssertionError:
                coherent = False
            checks[f"{sid}: one gapless answer, done, as stored"] = coherent
        taken = {sid: ask(lambda s=sid: data.hget(state_key(s), "worker")) for sid in sids}
        if sentinels is None:
            checks["host B finished every answer"] = all(on(worker_b, w) for w in taken.values())
        else:
            checks["the sentinels promoted the replica"] = sentinels.master_port() != first_master
        lengths = {sid: ask(lambda s=sid: data.xlen(log_key(s))) for sid in sids}
        cut.mend()
        if sentinels is not None:
            old = sentinels.node_client(sentinels.nodes[0])
            try:
                wait_for(lambda: _role(old) == b"slave", timeout=60, interval=0.5)
                checks["the old master came back as a replica"] = True
            except AssertionError:
                checks["the old master came back as a replica"] = False
            out["old_master_role"] = str(_role(old))
            checks["both workers are still running"] = worker_a.alive() and worker_b.alive()
        time.sleep(8.0)  # what was cut off is back: a worker finds its answers taken
        after = {sid: ask(lambda s=sid: data.xlen(log_key(s))) for sid in sids}
        checks[f"host {cut.name.upper()} changed no answer after its link came back"] = (
            after == lengths
        )
        out.update(
            writers={"before": writers, "after": taken},
            events={sid: len(e) for sid, e in events.items()},
            attempts={sid: client.stream(sid)["attempt"] for sid in sids},
            checks=checks,
            ok=all(checks.values()),
        )
        if not out["ok"]:
            out["logs"] = {p.name: p.output().splitlines()[-40:] for p in running}
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--answers", type=int, default=3)
    parser.add_argument("--words", type=int, default=300)
    kinds = parser.add_mutually_exclusive_group()
    kinds.add_argument("--log-cluster", action="store_true", help="logs on a Redis Cluster")
    kinds.add_argument(
        "--sentinel", action="store_true",
        help="Redis under Sentinel, its master on a host of its own, which is cut off",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print(json.dumps({"ok": False, "error": "needs root: ip netns and veth pairs"}))
        return 1
    with tempfile.TemporaryDirectory(prefix="relay-rehearsal-") as tmp:
        kind = "cluster" if args.log_cluster else "sentinel" if args.sentinel else "one"
        result = rehearse(Path(tmp), args.answers, args.words, kind)
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
