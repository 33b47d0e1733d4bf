"""``similar()`` scores its rows: it gains a ``score`` column and a ``min_score`` cut-off.

No table changes: the function is a derived object (:mod:`imgdb.db.derived`), remade after every
migration, whose former signature is dropped there; this revision makes existing databases remake
it.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Nothing to change in tables: :func:`imgdb.db.derived.install` remakes ``similar()``."""


def downgrade() -> None:
    """Nothing to undo in tables."""
