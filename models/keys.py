"""Every Redis key relay uses, in one place.

All per-stream keys carry the stream ID as a ``{hash tag}`` so a stream's log and state land
in the same Redis Cluster slot and one Lua script can touch both. (No "bucket" tags grouping
streams: the hub follows streams over pub/sub, not a multi-key XREAD, so nothing reads two
streams' keys in one command; see docs/operations.md, Redis Cluster.)
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


def viewers_key(stream_id: str) -> str:
    """A sorted set: one member per web process that has (or had) viewers of the stream, its
    score the server time (ms) until which one is known to be attached: a lease renewed by
    the process's hub while it has viewers, set to the time of leaving when its last viewer
    leaves. The detach policy's countdown runs from the highest score once it is past."""
    return f"{PREFIX}:{{{stream_id}}}:viewers"


def live_channel(stream_id: str) -> str:
    """Pub/sub channel: every script that adds entries to the log publishes them here in the
    same atomic step (``[first seq, [types], [data]]``), for the web tier's hubs."""
    return f"{PREFIX}:{{{stream_id}}}:live"


def hub_channel(hub_id: str) -> str:
    """One web process's hub: its own pub/sub connection is subscribed to it, and the
    process's viewers publish on it to wake the hub when the streams they watch change."""
    return f"{PREFIX}:hub:{hub_id}"


def feed_key(user_id: str) -> str:
    """A user's live feed (models/feed.py): a Redis Stream of what happens to their chats,
    entry IDs ``0-<seq>``; the last ``FEED_MAX_LEN`` entries are kept, and it expires
    ``FEED_TTL_S`` after its last write. The user ID is the hash tag: every feed key of a user
    lands in one Redis Cluster slot."""
    return f"{PREFIX}:{{user:{user_id}}}:feed"


def feed_channel(user_id: str) -> str:
    """Pub/sub channel: the feed's script publishes each entry here (its JSON) as it adds it."""
    return f"{PREFIX}:{{user:{user_id}}}:feed:live"


# What a web process's feed subscriber listens to (one PSUBSCRIBE for every user).
FEED_CHANNEL_PATTERN = f"{PREFIX}:{{user:*}}:feed:live"
FEED_MAX_LEN = 1000  # entries kept per user
FEED_TTL_S = 7 * 86400  # refreshed on every write


def user_id_from_feed_channel(channel: str) -> str:
    """Recover the user ID from ``feed_channel``."""
    return channel[channel.index("{user:") + 6 : channel.index("}")]


def idempotency_key(user_id: str, key_digest: str) -> str:
    """A user's Idempotency-Key (its SHA-256, so any key the client chose stays short): the
    request's body digest and, once answered, the response; 24 h."""
    return f"{PREFIX}:idem:{user_id}:{key_digest}"


# The rate limiters' keys (the ``limits`` package names them under this prefix: posts per
# user, new guests per client address).
RATE_LIMIT_PREFIX = f"{PREFIX}:limits"


def post_lock(user_id: str) -> str:
    """Held while one of the user's posts is admitted and committed (web/ratelimit.py)."""
    return f"{RATE_LIMIT_PREFIX}:post-lock:{user_id}"


# Held (SET NX PX, just under one sweep interval) by the worker sweeping this round.
SWEEPER_LOCK = f"{PREFIX}:sweeper-lock"


def stream_id_from_key(key: str) -> str:
    """Recover the stream ID from a per-stream key."""
    return key[key.index("{") + 1 : key.index("}")]
