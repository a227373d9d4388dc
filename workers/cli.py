"""``celery -A workers streams ...``: list, show, cancel, retry and sweep generations.

Registered through the ``celery.commands`` entry point (pyproject.toml), so the project must
be installed (``pip install -e .``, which the Makefile does).
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click
from celery.bin.base import CeleryCommand, CLIContext
from sqlalchemy import select
from sqlalchemy.orm import Session

from models import lifecycle
from models.exceptions import RelayError, StreamNotFound
from models.settings import Settings
from models.tables import Stream
from workers.celery_app import GENERATE
from workers.runtime import WorkerRuntime, build_runtime

STATUSES = ("queued", "running", "done", "cancelled", "failed")


def _runtime(ctx: click.Context) -> WorkerRuntime:
    cli: CLIContext = ctx.obj
    app = cli.app

    def enqueue(stream_id: str, task_id: str) -> None:
        app.send_task(GENERATE, args=[stream_id], task_id=task_id)

    return build_runtime(Settings.from_env(), enqueue, lambda _task_id: False)


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


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
        click.echo(json.dumps(_describe(rt, _stream(db, stream_id)), indent=2))


@streams.command(cls=CeleryCommand)
@click.argument("stream_id")
@click.pass_context
def cancel(ctx: click.Context, stream_id: str) -> None:
    """Cancel a stream; viewers get a cancelled event, the partial text is kept."""
    rt = _runtime(ctx)
    with rt.sessions() as db:
        stream = _stream(db, stream_id)
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
    report = rt.sweeper().sweep()
    click.echo(
        f"requeued {len(report.requeued)}, repaired {len(report.repaired)}, "
        f"sealed {len(report.sealed)}"
    )
