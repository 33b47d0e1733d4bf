"""Initial schema: pgvector, images, the index registry and learned index state.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Only where it is missing: on Citus, even CREATE EXTENSION IF NOT EXISTS goes to the workers,
    # where it needs the extension's owner.
    op.execute("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector') THEN"
               " CREATE EXTENSION vector; END IF; END $$")
    # Filtered vector queries from plain SQL (`WHERE ... ORDER BY embedding <-> q LIMIT k`) should
    # return k rows, not whatever survives the filter out of the first ef_search candidates: make
    # pgvector 0.8's iterative index scan the database's default. Needs ownership of the database;
    # where the migrating role lacks it, imgdb still sets it per query and the README says how.
    op.execute("""
        DO $$ BEGIN
          EXECUTE format('ALTER DATABASE %I SET hnsw.iterative_scan = strict_order', current_database());
        EXCEPTION WHEN insufficient_privilege THEN
          RAISE NOTICE 'imgdb: cannot set hnsw.iterative_scan for the database; set it per session';
        END $$""")
    op.create_table(
        "images",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("uri", sa.Text, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("format", sa.Text),
        sa.Column("file_size", sa.BigInteger, nullable=False),
        sa.Column("taken_at", sa.DateTime(timezone=False)),
        sa.Column("camera", sa.Text),
        sa.Column("metadata", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("ix_images_uri", "images", ["uri"])
    # Containment filters (`metadata @> '{"author": "..."}'`) use this; so do users' own queries.
    op.create_index("ix_images_metadata", "images", ["metadata"], postgresql_using="gin",
                    postgresql_ops={"metadata": "jsonb_path_ops"})
    op.create_table(
        "indexes",
        sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
        sa.Column("name", sa.Text, nullable=False, unique=True),
        sa.Column("extractor", sa.Text, nullable=False),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("metric", sa.Text, nullable=False, server_default="l2"),
        sa.Column("storage", sa.Text, nullable=False, server_default="vector"),
        sa.Column("ann", sa.Text, nullable=False, server_default="hnsw"),
        sa.Column("ann_params", JSONB, nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("name ~ '^[a-z][a-z0-9_]{0,39}$'", name="ck_indexes_name"),
    )
    op.create_table(
        "index_state",
        sa.Column("index_id", sa.Integer, sa.ForeignKey("indexes.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("value", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    # Per-index vector tables and their views hang off `images`; they go first.
    op.execute("""
        DO $$ DECLARE t text; BEGIN
          FOR t IN SELECT tablename FROM pg_tables
                   WHERE schemaname = current_schema() AND tablename LIKE 'imgdb\\_vectors\\_%' LOOP
            EXECUTE format('DROP TABLE %I CASCADE', t);
          END LOOP;
        END $$""")
    op.drop_table("index_state")
    op.drop_table("indexes")
    op.drop_table("images")
