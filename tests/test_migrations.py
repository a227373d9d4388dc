"""Alembic migrations match the models and run down and up again."""

from __future__ import annotations

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from models.db import make_engine
from models.migrate import alembic_config
from models.tables import Base


def test_migrations_match_the_models(database_url: str) -> None:
    engine = make_engine(database_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_downgrade_and_upgrade_again(fresh_database_url: str) -> None:
    cfg = alembic_config(fresh_database_url)
    command.downgrade(cfg, "base")
    command.upgrade(cfg, "head")
