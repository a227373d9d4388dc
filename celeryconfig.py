"""Celery settings for relay's workers; each says why it is set.

Loaded by ``workers.celery_app`` with ``config_from_object``; the broker comes from
CELERY_BROKER_URL, or REDIS_URL when that is unset.
"""

from kombu import Queue

from models.redisconn import broker_settings
from models.settings import Settings

_settings = Settings.from_env()

# A redis+sentinel:// URL becomes kombu's sentinel:// form plus the master's name.
broker_url, _sentinel_options = broker_settings(_settings.broker_url)
# Generations report through the Redis log and SQL, never through Celery results.
task_ignore_result = True
result_backend = None

# JSON only: tasks take a stream ID, nothing that needs pickle (and pickle runs code).
task_serializer = "json"
accept_content = ["json"]

# Acknowledge after the task returns, and give the message back if the worker process dies,
# so a crashed generation is redelivered. The heartbeat + attempt fence in the log makes a
# redelivered copy of a still-live stream a no-op (claim answers "busy").
task_acks_late = True
task_reject_on_worker_lost = True

# A generation lasts seconds to minutes: a worker must not hoard messages it cannot start.
worker_prefetch_multiplier = 1

# Redis broker: an unacknowledged message is redelivered after this long. It must exceed the
# longest generation, or a second copy starts while the first still runs (the claim fences it).
# max_connections: kombu's Redis pool (default 10) refuses a connection beyond it, and a
# gevent worker acknowledges many tasks at once ("Couldn't ack ... MaxConnectionsError").
# queue_order_strategy "priority": a worker's BRPOP names its queues in the order of
# task_queues below (kombu's default rotates them), so continuations go first.
broker_transport_options = {
    "visibility_timeout": 3600,
    "max_connections": 1000,
    "queue_order_strategy": "priority",
    **_sentinel_options,
}
broker_connection_retry_on_startup = True

# Backstops only: RELAY_MAX_GENERATION_S (1800 s), checked by the generation itself, ends a
# runaway answer with a "timeout" error event first. The gevent pool in the Procfile enforces
# these limits, so they sit above it (the threads pool ignores them).
task_soft_time_limit = 1900
task_time_limit = 1960

# New chats go to "relay"; continuations (a stream whose writer died or handed off, an admin
# retry) to "relay.continue", which every worker drains first, so recovering an answer never
# waits behind hundreds of new chats (workers.celery_app.CONTINUE_QUEUE).
task_default_queue = "relay"
task_queues = (Queue("relay.continue"), Queue("relay"))
# Task events (for `celery events` / Flower) are off: each costs a Redis round trip and
# they add ~1 ms to every answer's start (the sent event is published by the web tier with
# the task, the received and started events by the worker before it runs the task). Turn
# them on while you watch: `celery -A workers control enable_events` (and disable_events).
worker_send_task_events = False
task_send_sent_event = False
# Keep tracebacks and stream IDs readable in logs.
worker_hijack_root_logger = False
