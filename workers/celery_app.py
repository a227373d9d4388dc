"""The Celery application, configured from ``celeryconfig.py``."""

from __future__ import annotations

from typing import Any

import click
from celery import Celery
from celery.signals import user_preload_options

from models.settings import Settings, redis_notice
from ops.geventfix import readiness_checks_without_yield, repair_early_imports
from ops.kombufix import repair_late_restore, reuse_clients

repair_early_imports()  # before the worker connects to its broker
readiness_checks_without_yield()  # a Redis command must not turn the event loop first
repair_late_restore()  # a broker restart must not kill the worker
reuse_clients()  # one redis-py client per channel, not one per command

# The one task relay runs; the web tier enqueues it by name.
GENERATE = "relay.generate"
# Completion webhooks (workers/webhooks.py), sent by the sweeper.
WEBHOOK = "relay.webhook"
# Where continuations go (a stream whose writer died or handed off, an admin retry): workers
# take from it before the queue of new chats (celeryconfig.py: task_queues).
CONTINUE_QUEUE = "relay.continue"

app = Celery("relay", include=["workers.tasks"])
app.config_from_object("celeryconfig")

# Every `celery -A workers <command>` says first, on stderr, which Redis it uses and why
# (models.settings.redis_notice). Celery sends user_preload_options once per command, after
# the command line is parsed, but only when the app declares a preload option: this one
# (hidden; --no-redis-notice silences the line, e.g. in scripts).
app.user_options["preload"].add(
    click.Option(
        ["--redis-notice/--no-redis-notice"],
        default=True,
        hidden=True,
        help="Say on stderr which Redis the command uses.",
    )
)
_said = False


@user_preload_options.connect  # type: ignore[untyped-decorator]
def say_which_redis(options: dict[str, Any], **_: Any) -> None:
    global _said
    command = click.get_current_context(silent=True)
    # A worker names its broker in its start-up banner (the "transport" line).
    if (
        _said
        or not options.get("redis_notice", True)
        or (command and command.command.name == "worker")
    ):
        return
    _said = True
    click.echo(redis_notice(Settings.from_env()), err=True)
