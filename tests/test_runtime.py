"""web/runtime.py in-process: the request's SQL session ends cleanly when the database went
away during the request. The fault is real: PostgreSQL terminates the session's backend, as
a server restart does (``terminating connection due to administrator command``), after the
request read what it needed. ``make chaos`` met it as a 500 during its database restart."""

from __future__ import annotations

from typing import Any

import pytest
from flask import Flask, jsonify
from sqlalchemy import text

from tests.conftest import PG_URL
from tests.test_db import terminate
from web import create_app
from web.runtime import get_db

on_postgresql = pytest.mark.skipif(not PG_URL, reason="needs TEST_DATABASE_URL (PostgreSQL)")
only_postgresql = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


def app_ending_its_backend(database_url: str) -> Flask:
    """relay's app with one more route: it reads in the request's session, then the server
    ends that session's backend before the request is over."""
    app = create_app({"secret_key": "test", "database_url": database_url})

    @app.get("/probe")
    def probe() -> Any:
        pid = int(get_db().execute(text("SELECT pg_backend_pid()")).scalar_one())
        terminate(database_url, pid)
        return jsonify(pid=pid)

    @app.get("/again")
    def again() -> Any:
        return jsonify(pid=int(get_db().execute(text("SELECT pg_backend_pid()")).scalar_one()))

    return app


@on_postgresql
@only_postgresql
def test_a_backend_ended_during_a_request_leaves_its_answer_and_the_next_request_works(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = app_ending_its_backend(database_url)
    client = app.test_client()
    answered = client.get("/probe")
    assert answered.status_code == 200
    ended = answered.get_json()["pid"]
    assert "the request's SQL connection was lost" in caplog.text
    nxt = client.get("/again")  # the dead connection was discarded, not pooled
    assert nxt.status_code == 200
    assert nxt.get_json()["pid"] != ended
