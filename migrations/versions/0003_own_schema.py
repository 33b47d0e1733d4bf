"""One schema of imgdb's own, names that cannot collide, and the tables that attach application tables.

* An install of the previous layout (imgdb's tables beside the application's, usually in
  ``public``) is moved into imgdb's schema, rows, indexes and sequences with it; alembic's version
  table was handed over before this ran (:func:`imgdb.db.schema.adopt_legacy`).
* Per-index objects are named by the index's id (``vectors_<id>``, ``vectors_<id>_ann``), so that
  index ``a``'s ANN index and index ``a_ann``'s table can no longer be the same name; only the view
  users query keeps the index's name, and the relations of ``images`` that PostgreSQL had named
  ``images_*`` are renamed, so that no index name can reach them.
* Vector tables get ``direct``: false where only attached tables' rows put the image in the index.
* New tables: ``sources`` (attached tables), ``refs`` (their rows' keys → images), ``queue`` (keys
  whose rows changed, written by the attached tables' triggers), ``failures`` (rows that could not
  be embedded, retried with back-off), ``grants`` (roles given read access).

Views, functions and triggers are remade after the migration by :mod:`imgdb.db.derived`.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import context, op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def q(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def upgrade() -> None:
    bind = op.get_bind()
    schema = q(op.get_context().version_table_schema)
    legacy = context.config.attributes.get("legacy_schema")
    indexes = bind.execute(sa.text(f"SELECT id, name FROM {q(legacy) if legacy else schema}.indexes")).all()
    if legacy:
        old = q(legacy)
        for _, name in indexes:
            op.execute(f"DROP VIEW IF EXISTS {old}.{q('images_' + name)}")
            op.execute(f"ALTER TABLE {old}.{q('imgdb_vectors_' + name)} SET SCHEMA {schema}")
        for table in ("images", "indexes", "index_state"):
            op.execute(f"ALTER TABLE {old}.{table} SET SCHEMA {schema}")
        op.execute(f"DROP FUNCTION IF EXISTS {old}.imgdb_index_changed() CASCADE")
    op.execute(f"DROP FUNCTION IF EXISTS {schema}.imgdb_index_changed() CASCADE")

    op.execute(f"ALTER TABLE {schema}.images RENAME CONSTRAINT images_pkey TO pk_images")
    op.execute(f"ALTER TABLE {schema}.images RENAME CONSTRAINT images_sha256_key TO uq_images_sha256")
    op.execute(f"ALTER SEQUENCE {schema}.images_id_seq RENAME TO seq_images_id")
    for index_id, name in indexes:
        table = f"vectors_{index_id}"
        op.execute(f"DROP VIEW IF EXISTS {schema}.{q('images_' + name)}")
        op.execute(f"ALTER TABLE {schema}.{q('imgdb_vectors_' + name)} RENAME TO {table}")
        op.execute(f"ALTER TABLE {schema}.{table} RENAME CONSTRAINT {q('imgdb_vectors_' + name + '_pkey')}"
                   f" TO {table}_pkey")
        op.execute(f"ALTER TABLE {schema}.{table} ADD COLUMN direct boolean NOT NULL DEFAULT true")
    for index_id, _ in indexes:
        # The ANN index, where it exists: the one index on the table besides its primary key.
        ann = bind.execute(sa.text(
            "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid"
            " WHERE i.indrelid = CAST(:t AS regclass) AND NOT i.indisprimary"),
            {"t": f"{schema}.vectors_{index_id}"}).scalars().all()
        for name in ann:
            op.execute(f"ALTER INDEX {schema}.{q(name)} RENAME TO vectors_{index_id}_ann")

    op.create_table(
        "sources",
        sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
        sa.Column("index_id", sa.Integer, sa.ForeignKey("indexes.id", ondelete="CASCADE"), nullable=False),
        sa.Column("relid", sa.dialects.postgresql.OID, nullable=False),
        sa.Column("table_name", sa.Text, nullable=False),
        sa.Column("column_name", sa.Text, nullable=False),
        sa.Column("column_kind", sa.Text, nullable=False),
        sa.Column("key_column", sa.Text, nullable=False),
        sa.Column("key_type", sa.Text, nullable=False),
        sa.Column("root", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("id", name="pk_sources"),
        sa.UniqueConstraint("index_id", "relid", name="uq_sources_index_table"),
        sa.CheckConstraint("column_kind IN ('text', 'bytea')", name="ck_sources_kind"),
    )
    op.create_table(
        "refs",
        sa.Column("source_id", sa.Integer, sa.ForeignKey("sources.id", ondelete="CASCADE"), nullable=False),
        sa.Column("ref", sa.Text, nullable=False),
        sa.Column("image_id", sa.BigInteger, sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
        sa.Column("synced_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("source_id", "ref", name="pk_refs"),
    )
    op.create_index("ix_refs_image_id", "refs", ["image_id"])
    # Written by the attached tables' triggers inside the application's own statements: no key, no
    # index, no foreign key, so that queueing a change costs one heap insert and never waits.
    op.create_table(
        "queue",
        sa.Column("source_id", sa.Integer, nullable=False),
        sa.Column("ref", sa.Text, nullable=False),
        sa.Column("queued_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "failures",
        sa.Column("source_id", sa.Integer, sa.ForeignKey("sources.id", ondelete="CASCADE"), nullable=False),
        sa.Column("ref", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("first_failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_failed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retry_at", sa.DateTime(timezone=True)),
        sa.PrimaryKeyConstraint("source_id", "ref", name="pk_failures"),
    )
    op.create_table("grants", sa.Column("role", sa.Text, primary_key=True))


def downgrade() -> None:
    raise NotImplementedError("imgdb does not move back out of its schema: restore a backup to go back to 0002")
