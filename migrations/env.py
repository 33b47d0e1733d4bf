"""Alembic environment: migrate imgdb's schema in the database imgdb is configured to use.

imgdb passes an open connection (its search path starts with imgdb's schema) and the schema's
name in ``config.attributes``; a plain ``alembic upgrade head`` resolves the database and the schema
the same way the CLI does. Alembic's version table lives in imgdb's schema, never beside an
application's own ``alembic_version``.

One transaction, serialised across processes by an advisory lock: hand a previous layout's
version table over (:func:`imgdb.db.schema.adopt_legacy`), run the migrations, then, at the head
revision, remake the derived views and functions (:mod:`imgdb.db.derived`).
"""

import sqlalchemy as sa
from alembic import context
from sqlalchemy.engine import Connection

from imgdb.db import derived
from imgdb.db.schema import adopt_legacy
from imgdb.db.models import Base

config = context.config
#: Serialises concurrent first-use migrations from several processes (an arbitrary, fixed key).
MIGRATION_LOCK = 0x1D6DB


def include_object(obj, name, type_, reflected, compare_to) -> bool:  # noqa: ANN001 - alembic hook
    """Per-index vector tables are made at run time, not by migrations: autogenerate leaves them be."""
    if type_ == "table" and (name or "").startswith("vectors_"):
        return False
    return not (type_ == "table" and obj.info.get("per_index"))


def run(connection: Connection, schema: str) -> None:
    connection.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK)))
    config.attributes["legacy_schema"] = adopt_legacy(connection, schema)
    context.configure(connection=connection, target_metadata=Base.metadata, include_object=include_object,
                      version_table_schema=schema, include_schemas=False)
    with context.begin_transaction():
        context.run_migrations()
    if context.get_context().get_current_revision() == context.get_head_revision():
        derived.install(connection)


if context.is_offline_mode():
    raise SystemExit("imgdb migrations run online only: `alembic upgrade head` against a live database")

connection = config.attributes.get("connection")
if connection is not None:
    run(connection, config.attributes["schema"])
else:
    from imgdb.db.engine import Database

    database = Database.from_settings(migrate=False)
    with database.engine.connect() as conn:
        run(conn, database.schema)
        conn.commit()
