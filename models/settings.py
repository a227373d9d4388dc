"""Settings shared by the web tier and the workers, read once from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Runtime files (SQLite database, embedded Redis data, local secret key); git-ignored.
VAR_DIR = Path(os.environ.get("RELAY_VAR_DIR") or PROJECT_ROOT / "var")


def _default_database_url() -> str:
    return f"sqlite:///{VAR_DIR / 'relay.db'}"


@dataclass(frozen=True)
class Settings:
    """Every knob relay has; each maps to one environment variable (see README)."""

    database_url: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    broker_url: str = ""
    secret_key: str = ""
    # Finished logs stay in Redis this long; afterwards the text is served from SQL.
    log_retention_s: int = 3600
    # Safety TTL on a log that is still being written (refreshed on every append).
    running_log_ttl_s: int = 86400
    # GET /api/v1/chat falls back to the last answer if it finished this recently.
    resume_fallback_s: float = 15.0
    max_message_chars: int = 32_000
    max_request_bytes: int = 256 * 1024
    # The worker's group commit waits this long after the first pending piece to gather
    # more per Redis call (0: send at once; pieces that arrive meanwhile share a call anyway).
    coalesce_ms: float = 0.0
    # How long a worker rides out a Redis outage (appends retried with backoff, their fate
    # read back from the log) before the answer ends with backend_unavailable.
    backend_budget_s: float = 30.0
    # The worker copies the partial answer to SQL this often.
    checkpoint_interval_s: float = 2.0
    heartbeat_interval_s: float = 2.0
    # A running attempt whose heartbeat is older than this is presumed dead.
    heartbeat_stale_s: float = 8.0
    # The sweeper looks for streams whose writer died this often (one worker at a time).
    sweep_interval_s: float = 2.0
    # A stream queued this long without a worker claiming it has its task sent again.
    queued_grace_s: float = 300.0
    # A generation running longer than this ends with a "timeout" error.
    max_generation_s: float = 1800.0
    # On SIGTERM a worker lets generations run this long, then hands them to another worker.
    # Keep it below the supervisor's kill timeout (honcho: 5 s; Heroku: 30 s).
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
    # How to stream: httpx (lean, the default) | sdk (the official client; docs/providers.md).
    openai_transport: str = "httpx"
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
    # WebSocket permessage-deflate: "auto" accepts a client's offer and compresses messages
    # of at least ws_compress_min_bytes (catch-up batches); "off" never negotiates it.
    ws_compression: str = "auto"
    ws_compress_min_bytes: int = 1024
    # The server pings each WebSocket this often and closes one that did not answer the
    # previous ping (keeps proxies from timing out a quiet answer; finds dead clients).
    ws_ping_s: float = 25.0
    redis_max_connections: int = 200
    allowed_origins: tuple[str, ...] = ()
    # Mark the session cookie Secure (set it when relay is served over HTTPS).
    secure_cookies: bool = False
    chat_busy_policy: str = "reject"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from environment variables, falling back to defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(_env_name(f.name))
            if raw is not None and raw != "":
                values[f.name] = _coerce(f.name, raw, getattr(cls, f.name))
        settings = cls(**values)
        if not settings.database_url:
            settings = replace(settings, database_url=_default_database_url())
        if not settings.broker_url:
            settings = replace(settings, broker_url=settings.redis_url)
        return settings

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
