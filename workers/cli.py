"""``celery -A workers streams ...``: list, show, cancel, retry and sweep generations;
delete a user and everything of theirs.

Registered through the ``celery.commands`` entry point (pyproject.toml), so the project must
be installed (``pip install -e .``, which the Makefile does).
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click
from celery.bin.base import CeleryCommand, CLIContext
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from models import keys, lifecycle
from models.exceptions import RelayError, StreamNotFound
from models.settings import Settings, data_notice, shown_url
from models.tables import Chat, Stream, User
from workers.celery_app import CONTINUE_QUEUE, GENERATE
from workers.runtime import WorkerRuntime, build_runtime

STATUSES = ("queued", "running", "done", "cancelled", "failed")
LIVE_STATUSES = ("queued", "running")
# Exit code when the Redis reached is not the one that holds the stream.
WRONG_REDIS = 3


def _runtime(ctx: click.Context) -> WorkerRuntime:
    cli: CLIContext = ctx.obj
    app = cli.app

    def enqueue(stream_id: str, task_id: str) -> None:
        app.send_task(GENERATE, args=[stream_id], task_id=task_id, queue=CONTINUE_QUEUE)

    settings = Settings.from_env()
    # Which Redis: said on stderr (so stdout stays the command's answer; show prints JSON)
    # for every celery command by workers.celery_app.say_which_redis; where relay's data is,
    # here, when it is elsewhere.
    if notice := data_notice(settings):
        click.echo(notice, err=True)
    return build_runtime(settings, enqueue, lambda _task_id: False)


def _data_url(settings: Settings) -> str:
    """Where relay's own data is (RELAY_LOG_REDIS_URL; REDIS_URL when unset)."""
    return settings.log_redis_url or settings.redis_url


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _wrong_redis(what: str) -> NoReturn:
    _fail(
        f"{what}, so it is not the Redis of the stack that runs relay; nothing was changed. "
        "Run the command from that stack's project folder while its `make run` runs, or set "
        "REDIS_URL (and CELERY_BROKER_URL, if it differs) to that stack's Redis. (If this is "
        "that Redis and it lost its data, or the stream was posted a moment ago, a running "
        "worker's sweeper writes the state of live streams within seconds; then try again.)",
        WRONG_REDIS,
    )


def _require_live_state(rt: WorkerRuntime, stream: Stream) -> None:
    """Before any write: a stream SQL says is live has its state in its Redis from the
    moment it is posted (ChunkLog.init), so a Redis without it is another Redis."""
    if stream.status in LIVE_STATUSES and not rt.log.redis.exists(keys.state_key(stream.id)):
        _wrong_redis(
            f"stream {stream.id} is {stream.status} in SQL, but Redis "
            f"{shown_url(_data_url(rt.settings))} holds no state for it",
        )


def _looks_like_relays(rt: WorkerRuntime) -> bool:
    """Whether this Redis has served relay: it holds relay keys, or the broker's binding of
    the queue (kombu keeps it as long as the Redis lives)."""
    client = rt.log.redis
    if client.exists("_kombu.binding.relay"):
        return True
    return next(client.scan_iter(match="relay:*", count=1000), None) is not None


def _stream(db: Session, stream_id: str) -> Stream:
    stream = db.get(Stream, stream_id)
    if stream is None:
        _fail(f"no stream {stream_id!r}")
    return stream


def _describe(rt: WorkerRuntime, stream: Stream) -> dict[str, Any]:
    live = rt.log.state(stream.id)
    return {
        "id": stream.id,
        "status": live.status or stream.status,
        "sqlStatus": stream.status,
        "attempt": max(live.attempt, stream.attempt),
        "lastSeq": max(live.last_seq, stream.last_seq),
        "taskId": live.task_id or stream.task_id,
        "worker": live.worker,
        "cancelRequested": live.cancel_requested,
        "chatId": stream.chat_id,
        "messageId": stream.message_id,
        "createdAt": stream.created_at.isoformat(),
        "finishedAt": stream.finished_at.isoformat() if stream.finished_at else None,
        "error": {"code": stream.error_code, "message": stream.error_message}
        if stream.error_code
        else None,
    }


@click.group(name="streams")
def streams() -> None:
    """Inspect and control relay generations by stream ID."""


@streams.command(name="list", cls=CeleryCommand)
@click.option("--status", type=click.Choice(STATUSES), help="Only streams with this status.")
@click.option("--limit", default=50, show_default=True, help="At most this many, newest first.")
@click.pass_context
def list_streams(ctx: click.Context, status: str | None, limit: int) -> None:
    """List streams, newest first."""
    rt = _runtime(ctx)
    query = select(Stream).order_by(Stream.created_at.desc()).limit(limit)
    if status:
        query = query.where(Stream.status == status)
    with rt.sessions() as db:
        rows = [_describe(rt, s) for s in db.scalars(query)]
    if not rows:
        click.echo("no streams")
        return
    click.echo(f"{'STREAM ID':36}  {'STATUS':9}  {'ATTEMPT':>7}  {'SEQ':>6}  CREATED")
    for r in rows:
        click.echo(
            f"{r['id']:36}  {r['status']:9}  {r['attempt']:>7}  {r['lastSeq']:>6}  "
            f"{r['createdAt'][:19]}"
        )


@streams.command(cls=CeleryCommand)
@click.argument("stream_id")
@click.pass_context
def show(ctx: click.Context, stream_id: str) -> None:
    """Show one stream as JSON."""
    rt = _runtime(ctx)
    with rt.sessions() as db:
        stream = _stream(db, stream_id)
        _require_live_state(rt, stream)
        click.echo(json.dumps(_describe(rt, stream), indent=2))


@streams.command(cls=CeleryCommand)
@click.argument("stream_id")
@click.pass_context
def cancel(ctx: click.Context, stream_id: str) -> None:
    """Cancel a stream; viewers get a cancelled event, the partial text is kept."""
    rt = _runtime(ctx)
    with rt.sessions() as db:
        stream = _stream(db, stream_id)
        _require_live_state(rt, stream)
        result = lifecycle.cancel(rt.log, db, stream, rt.settings.heartbeat_stale_s)
    messages = {
        "requested": "cancel requested; the worker ends the stream at its next chunk",
        "finalized": "cancelled",
        "finished": f"stream had already ended ({stream.status}); nothing to cancel",
    }
    click.echo(f"{stream_id}: {messages[result]}")
    if result == "finished":
        sys.exit(2)


@streams.command(cls=CeleryCommand)
@click.argument("stream_id")
@click.pass_context
def retry(ctx: click.Context, stream_id: str) -> None:
    """Run a new attempt of a failed or cancelled stream on the same stream ID."""
    rt = _runtime(ctx)
    with rt.sessions() as db:
        stream = _stream(db, stream_id)
        _require_live_state(rt, stream)
        if not rt.log.exists(stream_id) and not _looks_like_relays(rt):
            # The retry would rebuild the log from SQL (as after its expiry) in this Redis.
            _wrong_redis(f"Redis {shown_url(_data_url(rt.settings))} holds no relay data")
        try:
            seq, task_id = lifecycle.retry(rt.log, db, stream_id, rt.enqueue)
        except StreamNotFound as exc:
            _fail(exc.message)
        except RelayError as exc:
            _fail(exc.message, 2)
    click.echo(f"{stream_id}: retrying as task {task_id}; the answer continues after seq {seq}")


@streams.command(cls=CeleryCommand)
@click.pass_context
def sweep(ctx: click.Context) -> None:
    """Recover streams whose worker died, once (workers also do this every few seconds)."""
    rt = _runtime(ctx)
    with rt.sessions() as db:
        live = list(
            db.scalars(select(Stream.id).where(Stream.status.in_(LIVE_STATUSES)).limit(200))
        )
    if live and not rt.log.redis.exists(*(keys.state_key(stream_id) for stream_id in live)):
        # The sweeper would take every one of them for lost and write them into this Redis.
        _wrong_redis(
            f"SQL has {len(live)} live stream(s), but Redis {shown_url(_data_url(rt.settings))} "
            "holds the state of none",
        )
    report = rt.sweeper().sweep()
    click.echo(
        f"requeued {len(report.requeued)}, repaired {len(report.repaired)}, "
        f"sealed {len(report.sealed)}"
    )


@streams.command(name="delete-user", cls=CeleryCommand)
@click.argument("user_id")
@click.pass_context
def delete_user(ctx: click.Context, user_id: str) -> None:
    """Delete a user with every chat, answer and log of theirs (running answers stop)."""
    rt = _runtime(ctx)
    with rt.sessions() as db:
        if db.get(User, user_id) is None:
            _fail(f"no user {user_id!r}")
        chat_ids = db.scalars(select(Chat.id).where(Chat.user_id == user_id)).all()
        live = db.scalar(
            select(Stream.id)
            .where(Stream.chat_id.in_(chat_ids), Stream.status.in_(LIVE_STATUSES))
            .limit(1)
        )
        if live is not None and not rt.log.redis.exists(keys.state_key(live)):
            _wrong_redis(f"stream {live} is live in SQL but this Redis holds no state for it")
        deleted = lifecycle.delete_chats(rt.log, db, chat_ids)
        rt.log.redis.delete(keys.feed_key(user_id))  # their live feed goes with them
        db.execute(delete(User).where(User.id == user_id))
        db.commit()
    click.echo(f"{user_id}: deleted, with {deleted} chat(s)")
