"""Alembic environment: migrate the database imgdb is configured to use.

imgdb itself passes an open connection in ``config.attributes["connection"]``; a plain
``alembic upgrade head`` resolves the database the same way the CLI does.
"""

from alembic import context
from sqlalchemy.engine import Connection

from imgdb.orm import Base

config = context.config


def include_object(obj, name, type_, reflected, compare_to) -> bool:  # noqa: ANN001 - alembic hook
    """Per-index vector tables are made at run time, not by migrations: autogenerate leaves them be."""
    if type_ == "table" and (name or "").startswith("imgdb_vectors_"):
        return False
    return not (type_ == "table" and obj.info.get("per_index"))


def run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata, include_object=include_object)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("imgdb migrations run online only: `alembic upgrade head` against a live database")

connection = config.attributes.get("connection")
if connection is not None:
    run(connection)
else:
    from imgdb.db.engine import Database

    with Database.from_settings(migrate=False).engine.connect() as conn:
        run(conn)
        conn.commit()
