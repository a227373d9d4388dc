"""The Celery application, configured from ``celeryconfig.py``."""

from __future__ import annotations

from celery import Celery

from ops.geventfix import repair_early_imports
from ops.kombufix import repair_late_restore

repair_early_imports()  # before the worker connects to its broker
repair_late_restore()  # a broker restart must not kill the worker

# The one task relay runs; the web tier enqueues it by name.
GENERATE = "relay.generate"
# Completion webhooks (workers/webhooks.py), sent by the sweeper.
WEBHOOK = "relay.webhook"
# Where continuations go (a stream whose writer died or handed off, an admin retry): workers
# take from it before the queue of new chats (celeryconfig.py: task_queues).
CONTINUE_QUEUE = "relay.continue"

app = Celery("relay", include=["workers.tasks"])
app.config_from_object("celeryconfig")
