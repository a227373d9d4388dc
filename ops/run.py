"""``make run``: embedded Redis (when REDIS_URL is unset), migrations, then the Procfile.

Ctrl-C or SIGTERM stops honcho (and with it web and workers), then the embedded Redis.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

from models.settings import PROJECT_ROOT, VAR_DIR
from ops.redis_server import EmbeddedRedis


def build_env() -> tuple[dict[str, str], EmbeddedRedis | None]:
    env = dict(os.environ)
    # The Procfile names gunicorn and celery: find them in this virtualenv.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PORT", "8000")
    env.setdefault("DATABASE_URL", f"sqlite:///{VAR_DIR / 'relay.db'}")
    # /metrics adds up every gunicorn worker process through this directory (emptied here).
    metrics_dir = VAR_DIR / "prometheus"
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(parents=True)
    env.setdefault("PROMETHEUS_MULTIPROC_DIR", str(metrics_dir))
    embedded = None
    if not env.get("REDIS_URL"):
        embedded = EmbeddedRedis(VAR_DIR / "redis", persistent=True).start()
        env["REDIS_URL"] = embedded.url
        print(f"relay: embedded Redis on {embedded.url} (data in var/redis)", flush=True)
    return env, embedded


def main(argv: list[str]) -> int:
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    env, embedded = build_env()
    bindir = Path(sys.executable).parent
    try:
        subprocess.run([sys.executable, "-m", "models.migrate"], env=env, check=True)
        print(f"relay: open http://127.0.0.1:{env['PORT']}/  (Ctrl-C stops everything)", flush=True)
        honcho = subprocess.Popen(
            [str(bindir / "honcho"), "start", "-f", str(PROJECT_ROOT / "Procfile"), *argv],
            env=env,
            cwd=PROJECT_ROOT,
        )

        def forward(signum: int, _frame: FrameType | None) -> None:
            if honcho.poll() is None:
                honcho.send_signal(signal.SIGTERM)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        return honcho.wait()
    finally:
        if embedded is not None:
            embedded.stop()
            print("relay: embedded Redis stopped", flush=True)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
