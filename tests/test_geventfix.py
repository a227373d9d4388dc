"""The worker's start-up under gevent: nothing kombu uses to wait may block the process."""

from __future__ import annotations

import subprocess
import sys

from tests.procs import ROOT

# What `celery -A workers worker --pool gevent` does first: patch, then load the app.
STARTUP = """
import sys
sys.argv = ["celery", "-A", "workers", "worker", "--pool", "gevent"]
from celery import maybe_patch_concurrency
maybe_patch_concurrency()
import workers.celery_app
import gevent, gevent.monkey, kombu.resource, kombu.utils.functional, queue
blocking = gevent.monkey.get_original("time", "sleep")
print(kombu.utils.functional.sleep is not blocking, kombu.resource.LifoQueue is queue.LifoQueue)
"""


def test_kombu_waits_with_gevent_not_with_a_blocking_sleep() -> None:
    out = subprocess.run(
        [sys.executable, "-c", STARTUP], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]
