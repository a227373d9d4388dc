"""Every Redis key relay uses, in one place.

All per-stream keys carry the stream ID as a ``{hash tag}`` so a stream's log and state land
in the same Redis Cluster slot and one Lua script can touch both.
"""

from __future__ import annotations

PREFIX = "relay"


def log_key(stream_id: str) -> str:
    """The chunk log: a Redis Stream whose entry IDs are ``0-<seq>``.

    No TTL while running except a safety TTL refreshed on each append
    (``running_log_ttl_s``); ``log_retention_s`` once the terminal event is written.
    """
    return f"{PREFIX}:{{{stream_id}}}:log"


def state_key(stream_id: str) -> str:
    """A hash: status, attempt (the writer fence), cancel flag, heartbeat, task id, last seq.

    Same TTLs as the log.
    """
    return f"{PREFIX}:{{{stream_id}}}:state"


def live_channel(stream_id: str) -> str:
    """Pub/sub channel: every script that adds entries to the log publishes them here in the
    same atomic step (``[first seq, [types], [data]]``), for the web tier's hubs."""
    return f"{PREFIX}:{{{stream_id}}}:live"


def hub_channel(hub_id: str) -> str:
    """One web process's hub: its own pub/sub connection is subscribed to it, and the
    process's viewers publish on it to wake the hub when the streams they watch change."""
    return f"{PREFIX}:hub:{hub_id}"


# Held (SET NX PX, just under one sweep interval) by the worker sweeping this round.
SWEEPER_LOCK = f"{PREFIX}:sweeper-lock"


def stream_id_from_key(key: str) -> str:
    """Recover the stream ID from a per-stream key."""
    return key[key.index("{") + 1 : key.index("}")]
