"""Settings shared by the web tier and the workers, read once from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from models.db import MAX_OVERFLOW, POOL_SIZE

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Runtime files (SQLite database, embedded Redis data, local secret key); git-ignored.
VAR_DIR = Path(os.environ.get("RELAY_VAR_DIR") or PROJECT_ROOT / "var")
# Written by `make run` while its embedded Redis runs (ops/run.py), removed when it stops.
REDIS_URL_FILE = VAR_DIR / "redis.url"


def _default_database_url() -> str:
    return f"sqlite:///{VAR_DIR / 'relay.db'}"


def recorded_redis_url() -> str:
    """The URL of the embedded Redis of a running `make run`, or "" when none is recorded."""
    try:
        return REDIS_URL_FILE.read_text().strip()
    except FileNotFoundError:
        return ""


def redis_origin(environ: Mapping[str, str] | None = None) -> str:
    """Where ``Settings.from_env(environ)`` takes its Redis URL from, for commands to say
    which Redis they use: "REDIS_URL", "make run" (var/redis.url) or "default"."""
    env = os.environ if environ is None else environ
    if env.get("REDIS_URL"):
        return "REDIS_URL"
    if environ is None and recorded_redis_url():
        return "make run"
    return "default"


# How the notice names each origin redis_origin() returns.
REDIS_ORIGINS = {
    "REDIS_URL": "REDIS_URL",
    "make run": f"make run's Redis, {REDIS_URL_FILE}",
    "default": "the default: REDIS_URL is unset and no make run recorded its Redis",
}


def shown_url(url: str) -> str:
    """The URL without its password (each URL of a kombu failover list "url1;url2")."""
    return ";".join(_without_password(part) for part in url.split(";"))


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if not parts.password:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


def redis_notice(settings: Settings) -> str:
    """The line every relay command prints on stderr first: which Redis it uses, where that
    came from, and the broker when CELERY_BROKER_URL points elsewhere. ``settings`` must be
    ``Settings.from_env()`` (the process environment), as redis_origin() reads it."""
    line = f"relay: using Redis {shown_url(settings.redis_url)} "
    line += f"({REDIS_ORIGINS[redis_origin()]})"
    if settings.broker_url != settings.redis_url:
        line += f"; broker {shown_url(settings.broker_url)} (CELERY_BROKER_URL)"
    return line


def data_notice(settings: Settings) -> str:
    """For commands that read or write relay's data: where it is when RELAY_LOG_REDIS_URL
    moves it off REDIS_URL ("" when it does not)."""
    data_url = settings.log_redis_url or settings.redis_url
    if data_url == settings.redis_url:
        return ""
    return f"relay: its data on {shown_url(data_url)} (RELAY_LOG_REDIS_URL)"


DETACH_POLICIES = ("continue", "cancel-after")
MIN_DETACH_S, MAX_DETACH_S = 1, 86400


@dataclass(frozen=True)
class Settings:
    """Every knob relay has; each maps to one environment variable (see README)."""

    database_url: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str = ""
    # Everything relay itself keeps in Redis (logs, stream states, live channels, limits,
    # idempotency, locks); default: redis_url. May be a redis+cluster:// URL (the broker,
    # redis_url / broker_url, cannot).
    log_redis_url: str = ""
    secret_key: str = ""
    # Finished logs stay in Redis this long; afterwards the text is served from SQL.
    log_retention_s: int = 3600
    # Safety TTL on a log that is still being written (set by an attempt's first append and
    # refreshed by appends whenever a tenth of it has passed).
    running_log_ttl_s: int = 86400
    # GET /api/v1/chat falls back to the last answer if it finished this recently.
    resume_fallback_s: float = 15.0
    max_message_chars: int = 32_000
    max_request_bytes: int = 256 * 1024
    # The worker's group commit waits this long after the first pending piece to gather
    # more per Redis call (0: send at once; pieces that arrive meanwhile share a call anyway).
    coalesce_ms: float = 0.0
    # Under load the group commit lets the worker's event loop turn this often before each
    # round trip, so pieces already on their way join it (0: never; a quiet process: never).
    append_gather: int = 1
    # How long a worker rides out a Redis outage (appends retried with backoff, their fate
    # read back from the log) before the answer ends with backend_unavailable.
    backend_budget_s: float = 30.0
    # Confirm each append only once this many replicas have it (Redis WAIT; 0: never wait),
    # waiting at most this long: a Sentinel failover then cannot lose a confirmed append.
    redis_wait_replicas: int = 0
    redis_wait_ms: int = 1000
    # The worker copies the partial answer to SQL this often.
    checkpoint_interval_s: float = 2.0
    heartbeat_interval_s: float = 2.0
    # A running attempt whose heartbeat is older than this is presumed dead.
    heartbeat_stale_s: float = 8.0
    # The sweeper looks for streams whose writer died this often (one worker at a time).
    sweep_interval_s: float = 2.0
    # A stream queued this long without a worker claiming it has its task sent again (then
    # after twice as long, and so on, while no worker claims a copy).
    queued_grace_s: float = 300.0
    # Claims, recovery sends and hand-offs a stream may take; past it the answer ends
    # failed with too_many_attempts (an admin retry starts a new budget).
    max_attempts: int = 5
    # A generation running longer than this ends with a "timeout" error.
    max_generation_s: float = 1800.0
    # On SIGTERM a worker lets generations run this long, then hands them to another worker.
    # Keep it below the supervisor's kill timeout (make run: 15 s or more; Heroku: 30 s).
    shutdown_grace_s: float = 3.0
    worker_metrics_port: int = 0
    # Test aid only: "point=seconds" pauses (see WorkerRuntime.fault).
    fault_pause: tuple[str, ...] = ()
    generator: str = "demo"
    # The default model, and the others a request may pick with "model" (comma-separated).
    model: str = "demo"
    allowed_models: tuple[str, ...] = ()
    # OpenAI-compatible provider (RELAY_GENERATOR=openai).
    openai_base_url: str = ""
    openai_api_key: str = ""
    openai_timeout_s: float = 60.0
    openai_retries: int = 3
    openai_retry_backoff_s: float = 0.5
    # How to continue a partial answer: none | vllm | prefix | trailing (docs/providers.md).
    openai_continuation: str = "none"
    # How to stream: urllib3 (lean, the default) | httpx (lean) | sdk (the official client);
    # docs/providers.md.
    openai_transport: str = "urllib3"
    max_output_tokens: int = 0  # 0: the provider's default
    system_prompt: str = ""
    # The conversation sent upstream is cut to the newest turns within this many characters.
    history_max_chars: int = 24_000
    demo_chunks_per_second: float = 30.0
    demo_directives: bool = True
    # A waiting viewer is woken by new events, its client and shutdown; it also wakes at
    # least this often (an idle tick), which bounds how late a half-open SSE client is seen.
    idle_tick_s: float = 10.0
    catchup_batch: int = 500
    viewer_queue_size: int = 2048
    # The hub checks every watched stream's last seq and writer this often, so a missed
    # live message or a dead writer is noticed even on a quiet stream.
    hub_check_s: float = 5.0
    # Live channels on a Redis Cluster: "auto" uses sharded pub/sub when every primary runs
    # Redis 7 or later; "off" keeps classic PUBLISH/SUBSCRIBE (every message crosses the
    # cluster bus). Set the same on every web and worker process.
    sharded_pubsub: str = "auto"
    # WebSocket permessage-deflate: "auto" accepts a client's offer and compresses messages
    # of at least ws_compress_min_bytes (catch-up batches); "off" never negotiates it.
    ws_compression: str = "auto"
    ws_compress_min_bytes: int = 1024
    # The server pings each WebSocket this often and closes one that did not answer the
    # previous ping (keeps proxies from timing out a quiet answer; finds dead clients).
    ws_ping_s: float = 25.0
    redis_max_connections: int = 200
    # How long a request waits for a free connection of that pool before giving up with 503 /
    # WebSocket 1013 "busy" (a burst waits; a Redis that is down is reported at once).
    redis_pool_wait_s: float = 60.0
    # PostgreSQL: each process keeps this many connections open once it has needed them,
    # and opens up to db_max_overflow more for a burst, each closed when handed back.
    db_pool_size: int = POOL_SIZE
    db_max_overflow: int = MAX_OVERFLOW
    allowed_origins: tuple[str, ...] = ()
    # Mark the session cookie Secure (set it when relay is served over HTTPS).
    secure_cookies: bool = False
    chat_busy_policy: str = "reject"
    # What happens to an answer when everyone leaves (a request may choose with "onDetach"):
    # "continue" to the end, or "cancel-after": cancel it (reason "abandoned", text kept)
    # once no viewer has been attached for on_detach_seconds.
    on_detach: str = "continue"
    on_detach_seconds: int = 60
    # Completion webhooks: when an answer ends while none of its viewers is attached, POST
    # it to this URL, signed the Standard Webhooks way with the secret ("whsec_<base64>");
    # tried up to webhook_max_attempts times with backoff. Empty: off.
    # An answer queued for longer than this has its queue position on its owner's feed
    # (answer.waiting, updated every sweep while it changes).
    queue_position_after_s: float = 1.0
    webhook_url: str = ""
    webhook_secret: str = ""
    webhook_timeout_s: float = 10.0
    webhook_max_attempts: int = 8
    # "production": refuse to start without SECRET_KEY (one key for every machine); anything
    # else lets a single machine keep a generated key in var/secret_key.
    env: str = "development"
    # When set, GET /metrics wants "Authorization: Bearer <token>".
    metrics_token: str = ""
    # Limits (429 with Retry-After; 0 turns one off): answers a user may have queued or
    # running at once, posts per user per minute, new guest users per client address per
    # minute (behind a proxy, the address is the proxy's unless it is trusted: see docs).
    max_running_per_user: int = 3
    posts_per_minute: int = 20
    new_guests_per_minute: int = 30
    # Reverse proxies in front of the web tier whose X-Forwarded-For, -Proto and -Host are
    # trusted (Werkzeug's ProxyFix with this many hops): the new-guest limit and the Origin
    # check then see the client's address and the public host. 0: the headers are ignored.
    trusted_proxies: int = 0
    # GET /api/v1/chats returns at most this many chats (newest first); ?limit= asks fewer.
    list_page_size: int = 50

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from environment variables, falling back to defaults (and, for
        the Redis URL of the process environment, to a running `make run`'s Redis)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(_env_name(f.name))
            if raw is not None and raw != "":
                values[f.name] = _coerce(f.name, raw, getattr(cls, f.name))
        # Without REDIS_URL, a command run next to a `make run` uses its embedded Redis rather
        # than 127.0.0.1:6379. Only from the process environment: an explicit mapping is
        # the whole configuration (tests, ops.supervise).
        if redis_origin(environ) == "make run":
            values["redis_url"] = recorded_redis_url()
        settings = cls(**values)
        if not settings.database_url:
            settings = replace(settings, database_url=_default_database_url())
        if not settings.broker_url:
            settings = replace(settings, broker_url=settings.redis_url)
        if not settings.log_redis_url:
            settings = replace(settings, log_redis_url=settings.redis_url)
        return settings

    def __post_init__(self) -> None:
        if self.on_detach not in DETACH_POLICIES:
            raise ValueError(f"RELAY_ON_DETACH must be one of {', '.join(DETACH_POLICIES)}, "
                             f"not {self.on_detach!r}")  # fmt: skip
        if not MIN_DETACH_S <= self.on_detach_seconds <= MAX_DETACH_S:
            raise ValueError(
                f"RELAY_ON_DETACH_SECONDS must be {MIN_DETACH_S}..{MAX_DETACH_S}, "
                f"not {self.on_detach_seconds}"
            )

        if self.sharded_pubsub not in ("auto", "off"):
            raise ValueError(
                f"RELAY_SHARDED_PUBSUB must be auto or off, not {self.sharded_pubsub!r}"
            )

        if self.webhook_url and not self.webhook_secret:
            raise ValueError("RELAY_WEBHOOK_URL needs RELAY_WEBHOOK_SECRET (whsec_<base64>)")

    def sharded(self) -> bool | None:
        """``ChunkLog``'s ``sharded``: None (decide from the cluster) or False."""
        return None if self.sharded_pubsub == "auto" else False

    def detach_after_s(self) -> int | None:
        """The deployment's detach policy as a stream stores it (None: continue)."""
        return self.on_detach_seconds if self.on_detach == "cancel-after" else None

    def allows_model(self, model: str) -> bool:
        return model == self.model or model in self.allowed_models

    def __repr__(self) -> str:  # never print the API key
        return f"Settings(generator={self.generator!r}, model={self.model!r}, ...)"

    def override(self, overrides: Mapping[str, Any] | None) -> Settings:
        """Return a copy with the given lower-case field overrides applied."""
        if not overrides:
            return self
        known = {f.name for f in fields(self)}
        picked = {k: v for k, v in overrides.items() if k in known}
        updated = replace(self, **picked)
        if "redis_url" in picked and "broker_url" not in picked:
            updated = replace(updated, broker_url=updated.redis_url)
        if "redis_url" in picked and "log_redis_url" not in picked:
            updated = replace(updated, log_redis_url=updated.redis_url)
        return updated


_UNPREFIXED = {"database_url", "redis_url", "secret_key", "openai_base_url", "openai_api_key"}


def _env_name(field_name: str) -> str:
    if field_name in _UNPREFIXED:
        return field_name.upper()
    if field_name == "broker_url":
        return "CELERY_BROKER_URL"
    return "RELAY_" + field_name.upper()


def _coerce(name: str, raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        return raw.strip().lower() in {"1", "true", "yes", "on"}
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    if isinstance(default, tuple):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw
