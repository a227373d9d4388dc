"""One JSON error shape for every failure: ``{"error": {"code": ..., "message": ...}}``."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, request
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from models.exceptions import RelayError, ServiceUnavailable, TooManyRequests
from models.redisconn import PoolExhausted, described

log = logging.getLogger("relay.web")
# What ends a request or a socket with 503 / 1013 (retry later) rather than a 500: a backend
# that does not answer, or a connection pool that stayed empty for its whole (long) wait.
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OperationalError,
    PoolTimeout,
)


def error_response(status: int, code: str, message: str) -> tuple[Response, int]:
    return jsonify(error={"code": code, "message": message}), status


def _relay_error(exc: RelayError) -> tuple[Response, int]:
    response, status = error_response(exc.status, exc.code, exc.message)
    if isinstance(exc, TooManyRequests):
        response.headers["Retry-After"] = str(exc.retry_after)
    return response, status


def _http_error(exc: HTTPException) -> tuple[Response, int]:
    status = exc.code or 500
    code = (exc.name or "error").lower().replace(" ", "_")
    if status == 413:
        code = "request_too_large"
    response, status = error_response(status, code, exc.description or exc.name)
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)  # a 405 must say (RFC 9110)
    return response, status


def _backend_down(exc: Exception) -> tuple[Response, int]:
    log.warning("backend unavailable: %s %s: %s", request.method, request.path, described(exc))
    return _relay_error(as_unavailable(exc))


def as_unavailable(exc: Exception) -> ServiceUnavailable:
    """Map a Redis or database outage to one clear, retryable error. A pool that had no
    free connection for its whole wait is not an outage: the process is overloaded, and the
    message says so (both are retryable)."""
    if isinstance(exc, PoolExhausted | PoolTimeout):
        return ServiceUnavailable("the server is too busy; try again shortly")
    which = "Redis" if isinstance(exc, RedisError) else "the database"
    return ServiceUnavailable(f"{which} is not answering; try again shortly")


def _unexpected(exc: Exception) -> tuple[Response, int]:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal_error", "something went wrong on our side")


def init_app(app: Flask) -> None:
    app.register_error_handler(RelayError, _relay_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(RedisConnectionError, _backend_down)
    app.register_error_handler(RedisTimeoutError, _backend_down)
    app.register_error_handler(OperationalError, _backend_down)
    app.register_error_handler(PoolTimeout, _backend_down)
    app.register_error_handler(Exception, _unexpected)
