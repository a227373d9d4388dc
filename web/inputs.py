"""What a request may carry, checked before anything reaches SQL or Redis.

A string that cannot be stored is a client error, never a 500: a lone surrogate (valid in
JSON's ``\\ud800`` escapes, not encodable as UTF-8), a NUL (PostgreSQL text refuses it; SQLite
would store it), a JSON document nested deeper than the parser's recursion limit, an id that
no row can have.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Flask, request

from models.exceptions import BadRequest, InvalidJSON, NotFound

# Every id relay issues is a UUID; client-chosen ids (the AI SDK's chat ids) are at most 64
# characters of [A-Za-z0-9_-]. Anything else cannot name a row.
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def json_object() -> dict[str, Any]:
    """The request body as a JSON object, or InvalidJSON (400)."""
    try:
        data = request.get_json(silent=True, force=True)
    except RecursionError:  # nesting deeper than the parser's recursion limit
        raise InvalidJSON("the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidJSON("the request body must be a JSON object")
    return data


def storable(text: str, what: str, error: type[BadRequest] = BadRequest) -> str:
    """``text`` if SQL can store it: no NUL, no lone surrogate; else ``error`` (400)."""
    if "\x00" in text:
        raise error(f"{what} must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"{what} must be valid Unicode (it has a lone surrogate)") from None
    return text


def is_id(value: str) -> bool:
    return ID_PATTERN.fullmatch(value) is not None


def check_id(value: str, error: type[NotFound] = NotFound) -> str:
    """``value`` if it can be an id; else ``error`` (404: no such thing)."""
    if not is_id(value):
        raise error(f"no such id: {value[:64]!r}")
    return value


def init_app(app: Flask) -> None:
    """Refuse path ids that cannot name a row (404) before any view runs, WebSocket routes
    included (the handshake is answered 404 instead of being upgraded)."""

    @app.url_value_preprocessor
    def _check_path_ids(_endpoint: str | None, values: dict[str, Any] | None) -> None:
        for name, value in (values or {}).items():
            if name.endswith("_id") and isinstance(value, str):
                check_id(value)
