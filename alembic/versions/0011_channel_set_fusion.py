"""Channel sets carry the fusion parameters fitted for them (weights, thresholds, CV score).

Revision ID: 0011
Revises: 0017 (written against 0003; chained after main's 0017 so that the tree has one head)
Create Date: 2026-12-02 08:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = "0011"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("channel_sets", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fusion_parameters", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("channel_sets", schema=None) as batch_op:
        batch_op.drop_column("fusion_parameters")
