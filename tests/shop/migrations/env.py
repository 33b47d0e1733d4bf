"""The alembic environment of "shop", an application with its own history: imgdb must leave it be.

Plain and typical: the default version table (``public.alembic_version``), its own models' tables in
``public``, a connection handed over in ``config.attributes``.
"""

from alembic import context

connection = context.config.attributes["connection"]
context.configure(connection=connection)
with context.begin_transaction():
    context.run_migrations()
