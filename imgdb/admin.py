"""The database an operator manages (``imgdb db ...``): which one imgdb uses, whether it is up,
starting and stopping the embedded server, and bringing imgdb's schema to the current revision.

Each function takes the settings (default: the environment's) and opens what it needs itself,
without a catalog: an operator's commands load no model and, but for the ones that need a
connection, no database driver.
"""

from __future__ import annotations

from typing import Any

from imgdb.config import Settings
from imgdb.db.embedded import EmbeddedServer
from imgdb.db.engine import Database


def database_url(settings: Settings | None = None) -> str:
    """The PostgreSQL URL imgdb uses, with the embedded server started (and the schema migrated)."""
    return Database.from_settings(settings or Settings.from_env()).url


def database_status(settings: Settings | None = None) -> dict[str, Any]:
    """Which database imgdb uses and whether it is up; an embedded server is not started for it."""
    settings = settings or Settings.from_env()
    if settings.database_url:
        database = Database(settings.database_url, schema=settings.schema, migrate=False,
                            read_url=settings.read_database_url)
        try:
            status = {"embedded": False, "running": True, "schema": settings.schema, "revision": database.revision(),
                      "citus": database.placement.citus}
            if database.read_url:
                status["read_replica"] = database.replica_status()
            if database.distributed:
                from imgdb.db import cluster

                with database.connect() as conn:
                    status["cluster"] = cluster.layout(conn)
            return status
        finally:
            database.dispose()
    status = EmbeddedServer(settings.home).status()
    return {"embedded": True, "running": status.running, "pgdata": str(status.pgdata), "pid": status.pid,
            "url": status.url, "schema": settings.schema}


def stop_embedded(settings: Settings | None = None) -> bool:
    """Stop the embedded server cleanly (its data is kept); False when it was not running."""
    return EmbeddedServer((settings or Settings.from_env()).home).stop()


def upgrade_database(settings: Settings | None = None) -> dict[str, Any]:
    """Apply pending migrations, creating pgvector and imgdb's schema where they are missing, as
    first use does: the command an operator runs first on a new database."""
    database = Database.from_settings(settings or Settings.from_env(), migrate=False, create=True)
    try:
        upgraded = database.upgrade()
        return {"upgraded": upgraded, "schema": database.schema, "revision": database.revision()}
    finally:
        database.dispose()
