"""A stand-in application ("shop") with its own alembic history, for tests/test_application.py."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).with_name("migrations")


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """The shop's own `alembic upgrade`, on its own connection and version table."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, revision)


def revision(engine: sa.Engine) -> str | None:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT version_num FROM public.alembic_version")).scalar()
