"""A later revision of the shop, applied after imgdb moved in: its migrations still run.

Revision ID: def456
Revises: abc123
"""

import sqlalchemy as sa
from alembic import op

revision = "def456"
down_revision = "abc123"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("photos", sa.Column("taken", sa.Date))


def downgrade() -> None:
    op.drop_column("photos", "taken")
