"""gunicorn's own error responses in relay's JSON error shape.

A request gunicorn refuses before the application sees it (a request line longer than
``limit_request_line``, headers past ``limit_request_fields`` / ``limit_request_field_size``,
a malformed request line or header) is answered by ``gunicorn.util.write_error``, which writes
an HTML page. Every other error of relay is ``{"error": {"code", "message"}}`` (web/errors.py),
and the OpenAPI document promises JSON. gunicorn offers no hook for this response, so its
worker's ``handle_error`` is left as it is (status, logging, access log) and only the writer it
calls is replaced. The codes are the status names lower-cased, as web/errors.py makes them for
Werkzeug's errors.
"""

from __future__ import annotations

import json
import socket
from http import HTTPStatus

# Statuses gunicorn answers itself (gunicorn.workers.base.Worker.handle_error).
CODES = {
    400: "bad_request",
    403: "forbidden",
    414: "request_uri_too_large",
    417: "expectation_failed",
    431: "request_header_fields_too_large",
    500: "internal_error",
    501: "not_implemented",
}


def error_bytes(status: int, reason: str, message: str) -> bytes:
    """The whole HTTP response for one of gunicorn's refusals; the connection is closed."""
    code = CODES.get(status) or HTTPStatus(status).phrase.lower().replace(" ", "_")
    body = json.dumps({"error": {"code": code, "message": message or reason}}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Connection: close\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    from gunicorn import util

    util.write_nonblock(sock, error_bytes(status_int, reason, mesg))


def install() -> None:
    """Make gunicorn's workers answer their own errors as JSON (called in each worker)."""
    from gunicorn import util

    util.write_error = write_json_error
