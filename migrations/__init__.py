"""imgdb's alembic migrations (installed as ``imgdb_migrations`` so that they ship with the wheel)."""

#: The newest revision. Every process that opens a database compares the schema's revision with
#: it, and reading it from here spares that process importing alembic and parsing every migration
#: (half a second of a cold start); tests/test_application.py checks it is alembic's own head.
HEAD = "0007"
