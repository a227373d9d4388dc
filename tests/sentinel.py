"""A Redis Sentinel deployment of the tests' own: a master, a replica and three sentinels,
each a redis-server process (the binary relay's embedded Redis uses) on a free loopback
port, in a directory of the test's. Stopped (by pid) when the test ends."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import redis

from ops.redis_server import EmbeddedRedis, free_port, redis_server_binary
from tests.client import wait_until

MASTER_NAME = "relay-test"
DOWN_AFTER_MS = 1000  # a master that does not answer for this long is down
FAILOVER_TIMEOUT_MS = 3000
LOOPBACK = "127.0.0.1"


class Sentinels:
    """master + replica + 3 sentinels; ``url`` is relay's ``redis+sentinel://`` URL.

    The replica and the sentinels listen on ``address``; the first master on
    ``master_address``, started through ``master_prefix`` (the multi-host rehearsal puts it
    on a "host" of its own, ``ip netns exec``). Each announces the address it listens on."""

    def __init__(
        self,
        workdir: Path,
        address: str = LOOPBACK,
        master_address: str | None = None,
        master_prefix: Sequence[str] = (),
    ) -> None:
        self.workdir = workdir
        self.address = address
        self.master_address = master_address or address
        self.master_prefix = master_prefix
        self.nodes: list[EmbeddedRedis] = []
        self.sentinels: list[subprocess.Popen[bytes]] = []
        self.sentinel_ports: list[int] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"{self.address}:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def start(self) -> Sentinels:
        master = EmbeddedRedis(
            self.workdir / "node0", address=self.master_address, prefix=self.master_prefix,
            extra=["--replica-announce-ip", self.master_address],
        ).start()  # fmt: skip
        self.nodes.append(master)
        replica = EmbeddedRedis(
            self.workdir / "node1", address=self.address,
            extra=["--replica-announce-ip", self.address],
        )  # fmt: skip
        replica.start()
        self.nodes.append(replica)
        self.node_client(replica).replicaof(master.address, master.port)
        wait_until(lambda: self._replica_in_sync(master), "the replica to sync")
        for i in range(3):
            self._start_sentinel(i, master.port)
        wait_until(self._sentinels_agree, "the sentinels to see the master and each other")
        return self

    def _start_sentinel(self, i: int, master_port: int) -> None:
        port = free_port()
        folder = self.workdir / f"sentinel{i}"
        folder.mkdir(parents=True, exist_ok=True)
        conf = folder / "sentinel.conf"  # Sentinel rewrites its configuration file
        bind = LOOPBACK if self.address == LOOPBACK else f"{self.address} {LOOPBACK}"
        conf.write_text(
            f"port {port}\nbind {bind}\ndir {folder}\nlogfile {folder / 'sentinel.log'}\n"
            f"sentinel announce-ip {self.address}\n"
            f"sentinel monitor {MASTER_NAME} {self.master_address} {master_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {MASTER_NAME} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        proc = subprocess.Popen(
            [redis_server_binary(), str(conf), "--sentinel"], start_new_session=True
        )
        self.sentinels.append(proc)
        self.sentinel_ports.append(port)

    def client(self, port: int, host: str | None = None) -> redis.Redis:
        """A client of one of the deployment's servers (by default on ``address``)."""
        return redis.Redis(
            host=host or self.address, port=port, socket_connect_timeout=1, socket_timeout=2
        )

    def node_client(self, node: EmbeddedRedis) -> redis.Redis:
        return self.client(node.port, node.address)

    def master_port(self) -> int:
        """The master's port as the first sentinel that answers reports it."""
        for port in self.sentinel_ports:
            try:
                reply = self.client(port).execute_command(
                    "SENTINEL", "get-master-addr-by-name", MASTER_NAME
                )
            except redis.RedisError:
                continue
            if reply:
                return int(reply[1])
        raise RuntimeError("no sentinel answered")

    def node(self, port: int) -> EmbeddedRedis:
        return next(n for n in self.nodes if n.port == port)

    def kill_master(self) -> int:
        """SIGKILL the current master; return its port."""
        port = self.master_port()
        self.node(port).kill()
        return port

    def rejoin(self, old_port: int, master_port: int) -> None:
        """Start the killed node again as the new master's replica. (Started empty as a
        master, as it was configured, it would be a master with no data until the sentinels
        reconfigure it; a sentinel that had not yet learned of the failover could instead
        make the new master its replica, and the new master would lose its data. Redis's
        documentation warns against restarting a master without persistence that way.)"""
        node = self.node(old_port)
        master = self.node(master_port)
        node.extra = [*node.extra, "--replicaof", master.address, str(master.port)]
        node.start()

    def wait_for_failover(self, old_port: int, timeout: float = 60) -> int:
        """Wait until the sentinels name another master and it answers as one."""

        def promoted() -> int | None:
            try:
                port = self.master_port()
                if port == old_port:
                    return None
                role = self.node_client(self.node(port)).execute_command("ROLE")
            except (redis.RedisError, RuntimeError):
                return None
            return port if role[0] == b"master" else None

        return int(wait_until(promoted, "a replica to be promoted", timeout))

    def _replica_in_sync(self, master: EmbeddedRedis) -> bool:
        info = self.node_client(master).info("replication")
        return int(info.get("connected_slaves", 0)) == 1 and "online" in str(info.get("slave0"))

    def _sentinels_agree(self) -> bool:
        for port in self.sentinel_ports:
            try:
                master = self.client(port).sentinel_master(MASTER_NAME)
            except redis.RedisError:
                return False
            if int(master["num-other-sentinels"]) < 2 or int(master["num-slaves"]) < 1:
                return False
        return True

    def stop(self) -> None:
        for proc in self.sentinels:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.sentinels:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for node in self.nodes:
            node.stop()
