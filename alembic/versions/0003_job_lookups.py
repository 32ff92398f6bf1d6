"""Index the job of a model version and of an evaluation: a (re-run) job finds the rows it created.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 08:20:00
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(op.f("ix_model_versions_job_id"), "model_versions", ["job_id"])
    op.create_index(op.f("ix_evaluations_job_id"), "evaluations", ["job_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_evaluations_job_id"), table_name="evaluations")
    op.drop_index(op.f("ix_model_versions_job_id"), table_name="model_versions")
