"""The index layer: a change counter per index, and a code column on every vector table.

``indexes.version`` goes up with every statement that writes an index's vectors (a trigger on its
table, so deletes cascading from ``images`` and users' own SQL count too). Processes that hold an
index's codes in memory compare it to know when to reload them. ``ann_code`` holds each vector's
product-quantization or LSH code for the Python-side first stages.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("indexes", sa.Column("version", sa.BigInteger, nullable=False, server_default="0"))
    op.execute("""
        CREATE FUNCTION imgdb_index_changed() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          UPDATE indexes SET version = version + 1 WHERE id = TG_ARGV[0]::int;
          RETURN NULL;
        END $$""")
    # Vector tables created by 0001 get what creating an index (imgdb.db.indexes.create) now gives new ones.
    op.execute("""
        DO $$ DECLARE r record; BEGIN
          FOR r IN SELECT id, name FROM indexes LOOP
            EXECUTE format('ALTER TABLE %I ADD COLUMN IF NOT EXISTS ann_code bytea', 'imgdb_vectors_' || r.name);
            EXECUTE format('CREATE TRIGGER imgdb_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON %I'
                           ' FOR EACH STATEMENT EXECUTE FUNCTION imgdb_index_changed(%L)',
                           'imgdb_vectors_' || r.name, r.id);
          END LOOP;
        END $$""")


def downgrade() -> None:
    op.execute("""
        DO $$ DECLARE r record; BEGIN
          FOR r IN SELECT name FROM indexes LOOP
            EXECUTE format('DROP TRIGGER IF EXISTS imgdb_changed ON %I', 'imgdb_vectors_' || r.name);
            EXECUTE format('ALTER TABLE %I DROP COLUMN IF EXISTS ann_code', 'imgdb_vectors_' || r.name);
          END LOOP;
        END $$""")
    op.execute("DROP FUNCTION imgdb_index_changed()")
    op.drop_column("indexes", "version")
