"""relay's web tier: ``create_app`` builds the Flask app (gunicorn: ``web:create_app()``)."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import click
from flask import Flask, request, send_from_directory
from flask.typing import ResponseReturnValue
from werkzeug.middleware.proxy_fix import ProxyFix

from models.settings import VAR_DIR, Settings, data_notice, redis_notice
from web import aisdk, api, errors, feed, inputs, metrics, openapi, runtime, streaming
from web.auth import check_origin
from web.websocket import COMPRESSION_MODES

log = logging.getLogger("relay.web")


def create_app(test_config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: defaults, then the environment, then ``test_config`` overrides.

    Lower-case keys of ``test_config`` override Settings fields (``redis_url``, ...);
    upper-case keys go to Flask's config (``SECRET_KEY``, ``TESTING``, ...).
    """
    overrides = dict(test_config or {})
    settings = Settings.from_env().override(overrides)
    if settings.ws_compression not in COMPRESSION_MODES:
        raise ValueError(f"RELAY_WS_COMPRESSION must be one of {', '.join(COMPRESSION_MODES)}")
    app = Flask(__name__, static_folder="static", static_url_path="/static")
    app.config.from_mapping(
        SECRET_KEY=secret_key(settings, VAR_DIR),
        MAX_CONTENT_LENGTH=settings.max_request_bytes,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        PERMANENT_SESSION_LIFETIME=timedelta(days=365),
        # Keepalive pings find dead peers; the size cap bounds what a client can send.
        SOCK_SERVER_OPTIONS={
            "ping_interval": settings.ws_ping_s or None,
            "max_message_size": 64 * 1024,
            "compression": settings.ws_compression,
            "compress_min_bytes": settings.ws_compress_min_bytes,
        },
        RELAY_SETTINGS=settings,
    )
    app.config.from_mapping({k: v for k, v in overrides.items() if k.isupper()})
    if settings.trusted_proxies > 0:  # X-Forwarded-* of this many proxies (docs/operations.md)
        hops = settings.trusted_proxies
        proxied = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops, x_host=hops)
        app.wsgi_app = proxied  # type: ignore[method-assign]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    runtime.init_app(app, settings)
    errors.init_app(app)
    inputs.init_app(app)
    api.init_app(app)
    app.register_blueprint(aisdk.bp)
    streaming.init_app(app)
    feed.init_app(app)
    metrics.init_app(app)
    openapi.init_app(app, settings)
    _register_pages(app)
    _guard_writes(app, settings)
    _register_cli(app, settings)
    return app


def secret_key(settings: Settings, var_dir: Path) -> str:
    """SECRET_KEY; without it, a key kept in ``var_dir`` (a single machine: restarts keep
    sessions). Production (RELAY_ENV=production) must set SECRET_KEY, or every machine would
    sign cookies with a key of its own."""
    if settings.secret_key:
        return settings.secret_key
    if settings.env == "production":
        raise RuntimeError("SECRET_KEY must be set when RELAY_ENV=production")
    return local_secret_key(var_dir)


def local_secret_key(var_dir: Path) -> str:
    """The key in ``var_dir/secret_key``, created if missing. Creation is atomic: the key is
    written to a file of this process's own, then linked into place, which fails if another
    process got there first (its key wins); nobody ever reads a half-written key."""
    path = var_dir / "secret_key"
    if not path.exists():
        var_dir.mkdir(parents=True, exist_ok=True)
        mine = var_dir / f".secret_key.{os.getpid()}.{secrets.token_hex(4)}"
        mine.write_text(secrets.token_hex(32))
        mine.chmod(0o600)
        try:
            os.link(mine, path)
            log.warning("relay: generated a secret key in %s (set SECRET_KEY to share one key "
                        "between machines)", path)  # fmt: skip
        except FileExistsError:
            pass
        finally:
            mine.unlink()
    key = path.read_text().strip()
    if not key:
        raise RuntimeError(f"{path} is empty: delete it (a new key is made) or set SECRET_KEY")
    return key


def _register_pages(app: Flask) -> None:
    @app.get("/")
    def index() -> ResponseReturnValue:
        assert app.static_folder is not None
        return send_from_directory(app.static_folder, "index.html")


def _guard_writes(app: Flask, settings: Settings) -> None:
    @app.before_request
    def same_origin_writes() -> None:
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            check_origin(settings.allowed_origins)


def _register_cli(app: Flask, settings: Settings) -> None:
    # `flask --app web <command>` (Flask sets FLASK_RUN_FROM_CLI for its CLI) says on stderr
    # which Redis the app uses, as every celery command does; the reloader's child of
    # `flask run --reload` does not say it again.
    if os.environ.get("FLASK_RUN_FROM_CLI") == "true" and not os.environ.get("WERKZEUG_RUN_MAIN"):
        click.echo(redis_notice(settings), err=True)
        if notice := data_notice(settings):
            click.echo(notice, err=True)

    @app.cli.command("create-token")
    @click.argument("name")
    def create_token(name: str) -> None:
        """Create an API user NAME and print its bearer token (shown once)."""
        from web.auth import create_api_user

        with runtime.get_runtime().sessions() as db:
            uid, token = create_api_user(db, name)
        click.echo(f"user {uid}\ntoken {token}")
