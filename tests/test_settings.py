"""Settings.from_env's fallback to the Redis a running `make run` recorded (var/redis.url):
only for the process environment without REDIS_URL; an explicit mapping stays the whole
configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import settings
from models.settings import Settings, redis_origin

RECORDED = "redis://127.0.0.1:45678/0"


@pytest.fixture
def recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A var/redis.url of this test's own, and no REDIS_URL or broker in the environment."""
    path = tmp_path / "redis.url"
    path.write_text(RECORDED + "\n")
    monkeypatch.setattr(settings, "REDIS_URL_FILE", path)
    for name in ("REDIS_URL", "CELERY_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    return path


def test_the_process_environment_falls_back_to_make_runs_redis(recorded: Path) -> None:
    loaded = Settings.from_env()
    assert (loaded.redis_url, loaded.broker_url) == (RECORDED, RECORDED)
    assert redis_origin() == "make run"
    recorded.unlink()  # make run stopped
    assert Settings.from_env().redis_url == "redis://127.0.0.1:6379/0"
    assert redis_origin() == "default"


def test_redis_url_and_explicit_mappings_win(
    recorded: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Settings.from_env({}).redis_url == "redis://127.0.0.1:6379/0"
    assert redis_origin({}) == "default"
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/1")
    assert Settings.from_env().redis_url == "redis://127.0.0.1:9/1"
    assert redis_origin() == "REDIS_URL"
