"""The web process's CPU to open one WebSocket connection: ``RelayServer`` built from a WSGI
environ, as gunicorn's gevent worker hands it over, with relay's own handshake and with
wsproto's (simple-websocket's ``Server.handshake``: the request rebuilt as text, parsed again
by h11, the reply written by h11), alternately in one process so drift hits both alike.

Each connection is a socketpair's end with a browser's headers (permessage-deflate offered);
the other end is drained as the replies pile up. Prints one JSON object: microseconds per
connection, the median of ``--repeat`` rounds of ``--n`` connections, for each handshake.

    .venv/bin/python -m bench.handshake [--n 2000] [--repeat 5]
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

# ruff: noqa: E402  (the imports below must see the patched socket)
import argparse
import base64
import json
import os
import platform
import socket
import statistics
import sys
import time
from typing import Any

from simple_websocket import Server

from web.websocket import RelayServer, add_no_server_context_takeover

BROWSER = {
    "REQUEST_METHOD": "GET",
    "PATH_INFO": "/api/v1/streams/0b1e0c5a-4a37-4a52-9d3c-2f1f8e1c6a10/ws",
    "QUERY_STRING": "after=0&batch=1",
    "HTTP_HOST": "127.0.0.1:8000",
    "HTTP_CONNECTION": "Upgrade",
    "HTTP_UPGRADE": "websocket",
    "HTTP_SEC_WEBSOCKET_VERSION": "13",
    "HTTP_SEC_WEBSOCKET_EXTENSIONS": "permessage-deflate; client_max_window_bits",
    "HTTP_USER_AGENT": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"
    " Chrome/120.0.0.0 Safari/537.36",
    "HTTP_ORIGIN": "http://127.0.0.1:8000",
    "HTTP_COOKIE": "session=" + "x" * 120,
    "HTTP_ACCEPT_ENCODING": "gzip, deflate, br",
    "HTTP_ACCEPT_LANGUAGE": "en-US,en;q=0.9",
    "HTTP_CACHE_CONTROL": "no-cache",
    "HTTP_PRAGMA": "no-cache",
}


class ViaWsproto(RelayServer):
    """relay's connection with simple-websocket's handshake, as relay had it before."""

    def handshake(self) -> None:
        offers = self.environ.get("HTTP_SEC_WEBSOCKET_EXTENSIONS")
        if offers is not None:
            self.environ = {**self.environ}
            self.environ["HTTP_SEC_WEBSOCKET_EXTENSIONS"] = add_no_server_context_takeover(offers)
        Server.handshake(self)


def drain(sock: socket.socket) -> None:
    try:
        while sock.recv(1 << 20):
            pass
    except BlockingIOError:
        pass


def round_us(cls: type[RelayServer], n: int, server: socket.socket, peer: socket.socket) -> float:
    """Microseconds of this process's CPU per connection, over ``n`` of them."""
    environs: list[dict[str, Any]] = []
    for _ in range(n):
        key = base64.b64encode(os.urandom(16)).decode()
        environs.append({**BROWSER, "HTTP_SEC_WEBSOCKET_KEY": key, "gunicorn.socket": server})
    started = time.process_time()
    for i, environ in enumerate(environs):
        cls(environ, ping_interval=25)
        if i % 50 == 49:
            drain(peer)
    return (time.process_time() - started) / n * 1e6


def run(n: int, repeat: int) -> dict[str, Any]:
    server, peer = socket.socketpair()
    peer.setblocking(False)
    rounds: dict[str, list[float]] = {"relay": [], "wsproto": []}
    round_us(RelayServer, 200, server, peer)  # warm up both
    round_us(ViaWsproto, 200, server, peer)
    for _ in range(repeat):
        rounds["relay"].append(round_us(RelayServer, n, server, peer))
        rounds["wsproto"].append(round_us(ViaWsproto, n, server, peer))
    medians = {name: statistics.median(values) for name, values in rounds.items()}
    return {
        "workload": "handshake",
        "host": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "config": {"connections_per_round": n, "rounds": repeat},
        "us_per_connection": {name: round(value, 1) for name, value in medians.items()},
        "rounds_us": {name: [round(v, 1) for v in values] for name, values in rounds.items()},
        "relay_over_wsproto": round(medians["relay"] / medians["wsproto"], 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(json.dumps(run(args.n, args.repeat), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
