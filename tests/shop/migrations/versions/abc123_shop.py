"""The shop's tables: its own ``images`` (a name imgdb once took in public) and ``photos``.

Revision ID: abc123
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "abc123"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("images", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("filename", sa.Text, nullable=False), sa.Column("caption", sa.Text))
    op.create_table("photos", sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("path", sa.Text), sa.Column("owner", sa.Text, nullable=False))


def downgrade() -> None:
    op.drop_table("photos")
    op.drop_table("images")
