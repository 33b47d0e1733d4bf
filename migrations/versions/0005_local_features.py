"""Local features for spatial verification, stored once per image.

``local_features`` holds, per image and local feature spec (``rootsift/side=640/keypoints=500``),
the keypoints' positions in the detection frame (float32 pairs), their descriptors quantized to one
byte per dimension, and the detection frame's scale, so that a re-rank verifies candidates without
reading an image file. The features depend on the image alone, not on an index's global descriptor:
indexes of the same images share them, and they go with the image (ON DELETE CASCADE).
``indexes.local`` names the spec an index verifies with (NULL: none).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("indexes", sa.Column("local", sa.Text, nullable=True))
    op.create_table(
        "local_features",
        sa.Column("image_id", sa.BigInteger, sa.ForeignKey("images.id", ondelete="CASCADE"), nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("scale", sa.Float, nullable=False),
        sa.Column("keypoints", sa.Integer, nullable=False),
        sa.Column("xy", sa.LargeBinary, nullable=False),
        sa.Column("descriptors", sa.LargeBinary, nullable=False),
        sa.PrimaryKeyConstraint("image_id", "spec", name="pk_local_features"),
    )


def downgrade() -> None:
    op.drop_table("local_features")
    op.drop_column("indexes", "local")
