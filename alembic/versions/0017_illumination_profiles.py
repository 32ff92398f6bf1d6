"""Illumination profiles: per-channel flatfields estimated per plate or dataset, or uploaded.

Revision ID: 0017
Revises: 0003
Create Date: 2026-12-02 08:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0017"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "illumination_profiles",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("source", sa.String(length=20), nullable=False),
        sa.Column("method", sa.String(length=20), nullable=False),
        sa.Column("channels", sa.JSON(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("has_darkfield", sa.Boolean(), nullable=False),
        sa.Column("blob_sha256", sa.String(length=64), nullable=False),
        sa.Column("inputs", sa.JSON(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=True),
        sa.Column("job_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_illumination_profiles_dataset_id_datasets")
        ),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_illumination_profiles_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_illumination_profiles")),
    )
    op.create_index(op.f("ix_illumination_profiles_job_id"), "illumination_profiles", ["job_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_illumination_profiles_job_id"), table_name="illumination_profiles")
    op.drop_table("illumination_profiles")
