"""Run every benchmark against private servers it starts, and print JSON."""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from pathlib import Path

import redis

from bench import fanout, log
from ops.redis_server import EmbeddedRedis


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        server = EmbeddedRedis(Path(tmp) / "redis").start()
        try:
            version = redis.Redis.from_url(server.url).info()["redis_version"]
            report = {
                "machine": {"python": platform.python_version(), "cpus": _cpus(),
                            "redis": version},
                "log": log.run(server.url),
                "fanout": fanout.run(server.url, Path(tmp)),
            }  # fmt: skip
        finally:
            server.stop()
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


if __name__ == "__main__":
    raise SystemExit(main())
