"""Fine-tuned networks, kept in the database with the indexes that encode with them.

``networks`` holds each network ``imgdb train`` produced: the weights that differ from its
backbone's ImageNet ones (safetensors bytes), keyed by their sha256, which is how an extractor spec
names them (``cnn:…/net=<sha256>``), with what it was trained on and how (method, hyper-parameters,
training images, the loss per epoch, seconds).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "networks",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("backbone", sa.Text, nullable=False),
        sa.Column("weights", sa.LargeBinary, nullable=False),
        sa.Column("method", sa.Text, nullable=False),
        sa.Column("params", JSONB, nullable=False, server_default="{}"),
        sa.Column("images", sa.Integer, nullable=False),
        sa.Column("loss", JSONB, nullable=False, server_default="[]"),
        sa.Column("seconds", sa.Float, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("sha256", name="pk_networks"),
    )


def downgrade() -> None:
    op.drop_table("networks")
