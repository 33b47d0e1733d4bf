"""Duplicates: the pairs ``imgdb duplicates`` judged, the groups it made of them, what it has compared.

``duplicate_pairs`` keeps every pair of an index's images judged the same picture (``near``) or the
same scene (``similar``), with its evidence (distance, calibrated score, verified inliers); the
groups are remade from them on every run into ``duplicate_members`` (one row per image and level,
``group_id`` the representative's image id). ``duplicate_checked`` lists the images whose nearest
neighbours were judged, so that a later run compares only what came since, and a killed run resumes.
A pair ``resolved`` by the user (``imgdb duplicates resolve``) never groups again. ``image_paths``
keeps the other paths and URLs a direct ingest found the same bytes at (``images.uri`` is the first):
the ``exact`` level.
The pair's second image has no foreign key: on a Citus cluster the tables are sharded by
``image_id`` with ``images``, and a key must include that column; the job leaves out pairs whose
second image has gone.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _keys() -> list[sa.Column]:
    return [sa.Column("index_id", sa.Integer, sa.ForeignKey("indexes.id", ondelete="CASCADE"), nullable=False),
            sa.Column("image_id", sa.BigInteger, sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False)]


def _evidence() -> list[sa.Column]:
    return [sa.Column("level", sa.Text, nullable=False), sa.Column("distance", sa.Float, nullable=False),
            sa.Column("score", sa.Float, nullable=False), sa.Column("inliers", sa.Integer, nullable=True)]


def upgrade() -> None:
    op.create_table("duplicate_pairs", *_keys(), sa.Column("other_id", sa.BigInteger, nullable=False), *_evidence(),
                    sa.Column("resolved", sa.Boolean, nullable=False, server_default=sa.false()),
                    sa.PrimaryKeyConstraint("index_id", "image_id", "other_id", name="pk_duplicate_pairs"))
    op.create_table("duplicate_members", *_keys(), sa.Column("group_id", sa.BigInteger, nullable=False), *_evidence(),
                    sa.PrimaryKeyConstraint("index_id", "level", "image_id", name="pk_duplicate_members"))
    op.create_table("duplicate_checked", *_keys(),
                    sa.PrimaryKeyConstraint("index_id", "image_id", name="pk_duplicate_checked"))
    op.create_table("image_paths",
                    sa.Column("image_id", sa.BigInteger, sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
                    sa.Column("uri", sa.Text, nullable=False),
                    sa.PrimaryKeyConstraint("image_id", "uri", name="pk_image_paths"))


def downgrade() -> None:
    for table in ("image_paths", "duplicate_checked", "duplicate_members", "duplicate_pairs"):
        op.drop_table(table)
