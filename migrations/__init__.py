"""imgdb's alembic migrations (installed as ``imgdb_migrations`` so that they ship with the wheel)."""
