"""Mark model versions trained on pseudo-labels (self-training, no human annotation).

Revision ID: 0015
Revises: 0012
Create Date: 2026-12-02 08:10:00
"""

import sqlalchemy as sa

from alembic import op

revision = "0015"
down_revision = "0012"  # chained after main's head
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "model_versions", sa.Column("pseudo_labelled", sa.Boolean(), nullable=False, server_default=sa.false())
    )


def downgrade() -> None:
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("pseudo_labelled")
