"""The Celery application, configured from ``celeryconfig.py``."""

from __future__ import annotations

from celery import Celery

from ops.geventfix import repair_early_imports

repair_early_imports()  # before the worker connects to its broker

# The one task relay runs; the web tier enqueues it by name.
GENERATE = "relay.generate"

app = Celery("relay", include=["workers.tasks"])
app.config_from_object("celeryconfig")
