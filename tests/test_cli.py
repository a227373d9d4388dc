"""Admin commands find the stack they administer: without REDIS_URL, ``celery -A workers
streams ...`` run next to a ``make run`` uses the Redis it recorded in var/redis.url, and says
so; pointed at a Redis that does not hold a live stream, it refuses and writes nothing there.

Real processes: the commands run as subprocesses against real Redis servers of the test's own
and a migrated SQLite file in the var directory (where ``make run`` keeps it)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from sqlalchemy.orm import Session, sessionmaker

from models.chunklog import ChunkLog
from models.db import make_engine, make_sessionmaker
from models.redisconn import make_redis
from models.tables import Chat, Message, Stream, User
from ops.redis_server import EmbeddedRedis
from tests.conftest import migrated_database
from tests.procs import BIN, ROOT

WRONG_REDIS = 3  # workers/cli.py


@dataclass
class Setup:
    var: Path
    home: EmbeddedRedis  # the Redis `make run` recorded, holding the live stream
    running: str  # a stream SQL and `home` say is running
    failed: str  # a failed stream whose log has expired


def _add_stream(sessions: sessionmaker[Session], status: str) -> str:
    """A stream with its user, chat and pending answer, straight into SQL."""
    with sessions() as db:
        user = User()
        db.add(user)
        db.flush()
        chat = Chat(user_id=user.id, title="admin")
        db.add(chat)
        db.flush()
        answer = Message(chat_id=chat.id, position=1, role="assistant", status="pending")
        db.add(answer)
        db.flush()
        stream = Stream(chat_id=chat.id, message_id=answer.id, status=status, attempt=1)
        stream.task_id = stream.id = f"cli-{status}-{os.urandom(4).hex()}"
        db.add(stream)
        db.commit()
        return stream.id


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    var = tmp_path / "var"
    home = EmbeddedRedis(tmp_path / "home-redis").start()
    try:
        with migrated_database("sqlite", var) as url:
            engine = make_engine(url)
            sessions = make_sessionmaker(engine)
            running, failed = _add_stream(sessions, "running"), _add_stream(sessions, "failed")
            engine.dispose()
            # As the web tier and a worker leave it: queued at post time, then claimed.
            chunks = ChunkLog(make_redis(home.url))
            chunks.init(running)
            assert chunks.claim(running, running, 600.0, worker="vm:4242").result == "claimed"
            chunks.redis.close()
            (var / "redis.url").write_text(home.url + "\n")  # as ops/run.py writes it
            yield Setup(var, home, running, failed)
    finally:
        home.stop()


def run(setup: Setup, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    """A command (``celery`` or ``flask`` from the virtualenv) run from the project folder,
    without REDIS_URL unless given; SQL is the var directory's default database, as under
    ``make run``."""
    unset = {"REDIS_URL", "DATABASE_URL"}
    environ = {
        k: v
        for k, v in os.environ.items()
        if k not in unset and not k.startswith(("RELAY_", "CELERY_", "FLASK_"))
    }
    environ.update(RELAY_VAR_DIR=str(setup.var), RELAY_HEARTBEAT_STALE_S="600", **env)
    return subprocess.run(
        [str(BIN / argv[0]), *argv[1:]],
        env=environ, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def streams(setup: Setup, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``celery -A workers streams ...``, as ``run`` runs it."""
    return run(setup, "celery", "-A", "workers", "streams", *args, **env)


def connections(server: EmbeddedRedis) -> int:
    """How many connections the server has taken (this one included)."""
    client = redis.Redis.from_url(server.url)
    try:
        return int(client.info("stats")["total_connections_received"])
    finally:
        client.close()


def test_commands_use_the_redis_make_run_recorded(setup: Setup) -> None:
    shown = streams(setup, "show", setup.running)
    assert shown.returncode == 0, shown.stderr
    assert f"relay: using Redis {setup.home.url} (make run's Redis" in shown.stderr
    assert shown.stderr.count("relay: using Redis") == 1  # said once, not by Celery and us
    described = json.loads(shown.stdout)
    assert described["status"] == "running" and described["worker"] == "vm:4242"
    cancelled = streams(setup, "cancel", setup.running)
    assert cancelled.returncode == 0, cancelled.stderr
    assert "cancel requested" in cancelled.stdout
    home = redis.Redis.from_url(setup.home.url, decode_responses=True)
    assert home.hget(f"relay:{{{setup.running}}}:state", "cancel") == "1"
    home.close()


def test_a_redis_without_the_stream_is_refused_and_left_untouched(
    setup: Setup, tmp_path: Path
) -> None:
    foreign = EmbeddedRedis(tmp_path / "foreign-redis").start()
    try:
        for args in (("cancel", setup.running), ("show", setup.running), ("sweep",)):
            refused = streams(setup, *args, REDIS_URL=foreign.url)
            assert refused.returncode == WRONG_REDIS, refused.stdout + refused.stderr
            assert f"relay: using Redis {foreign.url} (REDIS_URL)" in refused.stderr
            assert "not the Redis of the stack" in refused.stderr
        # A retry would rebuild the expired log of a failed stream from SQL: not in a Redis
        # that never served relay.
        retried = streams(setup, "retry", setup.failed, REDIS_URL=foreign.url)
        assert retried.returncode == WRONG_REDIS, retried.stdout + retried.stderr
        assert "holds no relay data" in retried.stderr
        client = redis.Redis.from_url(foreign.url)
        assert client.dbsize() == 0  # no relay keys, no queued task
        client.close()
    finally:
        foreign.stop()
    home = redis.Redis.from_url(setup.home.url, decode_responses=True)
    assert home.hget(f"relay:{{{setup.running}}}:state", "cancel") is None  # not cancelled
    home.close()


# Celery's own commands (inspect, control, status, purge, events, ...) say it too, and talk to
# that Redis as their broker: `inspect ping` with no worker waits --timeout, then exits 69.
PING = ("celery", "-A", "workers", "inspect", "ping", "--timeout", "1")


def test_celery_commands_name_and_use_the_redis_of_redis_url(setup: Setup, tmp_path: Path) -> None:
    foreign = EmbeddedRedis(tmp_path / "foreign-redis").start()
    try:
        before = connections(foreign), connections(setup.home)
        pinged = run(setup, *PING, REDIS_URL=foreign.url)
        assert pinged.returncode == 69, pinged.stdout + pinged.stderr  # no worker answered
        assert pinged.stderr.splitlines()[0] == f"relay: using Redis {foreign.url} (REDIS_URL)"
        assert pinged.stderr.count("relay: using Redis") == 1
        # It asked that Redis (the broker), not the one make run recorded.
        assert connections(foreign) > before[0] + 1
        assert connections(setup.home) == before[1] + 1  # only connections()'s own
    finally:
        foreign.stop()
    # Never a password; a broker of its own is named with it (the report connects nowhere).
    report = run(
        setup, "celery", "-A", "workers", "report",
        REDIS_URL="redis://:s3cret@127.0.0.1:1/0",
        CELERY_BROKER_URL="redis://:other@127.0.0.1:2/0",
    )  # fmt: skip
    assert report.returncode == 0, report.stderr
    assert report.stderr.splitlines()[0] == (
        "relay: using Redis redis://:***@127.0.0.1:1/0 (REDIS_URL); "
        "broker redis://:***@127.0.0.1:2/0 (CELERY_BROKER_URL)"
    )
    assert "s3cret" not in report.stderr + report.stdout
    assert "other@" not in report.stderr + report.stdout


def test_celery_commands_without_redis_url_name_and_use_the_recorded_redis(
    setup: Setup,
) -> None:
    before = connections(setup.home)
    pinged = run(setup, *PING)
    assert pinged.returncode == 69, pinged.stdout + pinged.stderr
    assert pinged.stderr.splitlines()[0] == (
        f"relay: using Redis {setup.home.url} (make run's Redis, {setup.var / 'redis.url'})"
    )
    assert connections(setup.home) > before + 1
    quiet = run(setup, *PING, "--no-redis-notice")
    assert "relay: using Redis" not in quiet.stderr


def test_flask_commands_name_the_redis_they_use(setup: Setup) -> None:
    created = run(setup, "flask", "--app", "web", "create-token", "cli-notice")
    assert created.returncode == 0, created.stderr
    assert f"relay: using Redis {setup.home.url} (make run's Redis" in created.stderr
    assert created.stderr.count("relay: using Redis") == 1
    assert created.stdout.startswith("user ")
