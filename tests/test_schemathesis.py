"""schemathesis (``st run``) against a live stack: every operation of the OpenAPI document
(web/openapi.py), fuzzed with a bounded number of examples, gets no server error and only
responses the document describes (status, content type, headers, body schema).

The stack is real: gunicorn, a Celery worker, Redis, SQLite. Requests carry a guest cookie
and an Origin of the server's own, so writes get past the Origin check and every request is
one user (the stateful phase then follows its own posts to their chats and streams)."""

from __future__ import annotations

import re
import subprocess

import pytest
import requests

from tests.conftest import Stack
from tests.procs import BIN
from web.openapi import PATH

CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    # A method the document does not list for a path is 405 with an Allow header.
    "unsupported_method",
    "allow_header_conformance",
)
# The WebSocket endpoints cannot be fuzzed over plain HTTP: a request with the upgrade
# headers they document turns the connection into a WebSocket, which an HTTP client then
# waits on until its timeout. (Their plain-GET answer, 400, is checked in test_openapi.py.)
# The feed's SSE response never ends by itself (it follows the user's feed until the client
# leaves): test_feed.py reads it.
EXCLUDED = ("chatSocket", "streamSocket", "feedSocket", "feedEvents")
MAX_EXAMPLES = 10  # per operation and phase: about 700 requests, 20-60 s on two cores


# The demo answers at its top speed without directives (a fuzzed message must not ask for a
# 20,000-word answer): every SSE and AI SDK response of a running answer ends within a
# second, so no response is long-lived. Limits are off in test stacks.
@pytest.mark.stack_env(RELAY_DEMO_CHUNKS_PER_SECOND="1000", RELAY_DEMO_DIRECTIVES="0")
@pytest.mark.timeout(240)  # 20-60 s, more on a machine busy with other work
def test_every_operation_answers_as_documented(
    isolated_stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> None:
    stack = isolated_stack
    stack.start_worker("fuzz", concurrency=16)
    guest = requests.get(stack.base_url + "/api/v1/chats", timeout=10)
    cookie = guest.cookies["session"]
    args = [
        str(BIN / "st"), "run", stack.base_url + PATH,
        "--header", f"Cookie: session={cookie}",
        "--header", f"Origin: {stack.base_url}",
        "--checks", ",".join(CHECKS),
        "--max-examples", str(MAX_EXAMPLES),
        "--request-timeout", "20",
        # One user throughout: generated session cookies or bearer tokens would make every
        # request a stranger (404s and 401s only) and hide the operations' real answers.
        "--generation-with-security-parameters", "false",
        "--generation-database", "none",
        "--no-color",
        *(arg for op in EXCLUDED for arg in ("--exclude-operation-id", op)),
    ]  # fmt: skip
    workdir = tmp_path_factory.mktemp("schemathesis")  # its reports and replay cache
    run = subprocess.run(args, cwd=workdir, capture_output=True, text=True, timeout=200)
    report = run.stdout[-30_000:] + run.stderr[-5_000:]
    assert run.returncode == 0, report
    cases = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert cases is not None and int(cases[2]) > 0, report  # it did test something
    log = stack.web.output()
    # A failure after the status line (inside an SSE body) is no 5xx: the web log shows it.
    assert "Error handling request" not in log and "unhandled error" not in log, log[-5_000:]
