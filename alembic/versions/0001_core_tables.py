"""Core tables: cell lines, reporters, datasets and images, base models, model versions, aliases,
channel sets, jobs and their results, API keys, worker heartbeats.

Revision ID: 0001
Revises:
Create Date: 2026-11-21 03:07:22.404249
"""

from alembic import op
import sqlalchemy as sa


revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=120), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_keys_prefix"), ["prefix"], unique=False)

    op.create_table(
        "base_models",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=120), nullable=False),
        sa.Column("source", sa.String(length=20), nullable=False),
        sa.Column("weights_sha256", sa.String(length=64), nullable=False),
        sa.Column("card", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_base_models")),
        sa.UniqueConstraint("name", name=op.f("uq_base_models_name")),
    )
    op.create_table(
        "cell_lines",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=120), nullable=False),
        sa.Column("species", sa.String(length=120), nullable=True),
        sa.Column("tissue", sa.String(length=120), nullable=True),
        sa.Column("notes", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_cell_lines")),
        sa.UniqueConstraint("name", name=op.f("uq_cell_lines_name")),
    )
    op.create_table(
        "reporters",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=120), nullable=False),
        sa.Column("fluorophore", sa.String(length=120), nullable=True),
        sa.Column("protein", sa.String(length=120), nullable=True),
        sa.Column("localisation", sa.String(length=120), nullable=True),
        sa.Column("notes", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reporters")),
        sa.UniqueConstraint("name", name=op.f("uq_reporters_name")),
    )
    op.create_table(
        "worker_heartbeats",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("queues", sa.JSON(), nullable=False),
        sa.Column("info", sa.JSON(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_worker_heartbeats")),
    )
    op.create_table(
        "datasets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("cell_line_id", sa.Integer(), nullable=False),
        sa.Column("channels", sa.JSON(), nullable=False),
        sa.Column("acquisition", sa.JSON(), nullable=False),
        sa.Column("notes", sa.Text(), nullable=True),
        sa.Column("owner_key_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["cell_line_id"], ["cell_lines.id"], name=op.f("fk_datasets_cell_line_id_cell_lines")),
        sa.ForeignKeyConstraint(["owner_key_id"], ["api_keys.id"], name=op.f("fk_datasets_owner_key_id_api_keys")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("kind", sa.String(length=30), nullable=False),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("stage", sa.String(length=200), nullable=False),
        sa.Column("progress", sa.Float(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=200), nullable=True),
        sa.Column("owner_key_id", sa.Integer(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("stage_timings", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["owner_key_id"], ["api_keys.id"], name=op.f("fk_jobs_owner_key_id_api_keys")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
        sa.UniqueConstraint("owner_key_id", "idempotency_key", name=op.f("uq_jobs_owner_key_id_idempotency_key")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_kind"), ["kind"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_status"), ["status"], unique=False)
        batch_op.create_index("ix_jobs_status_heartbeat", ["status", "heartbeat_at"], unique=False)

    op.create_table(
        "channel_sets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cell_line_id", sa.Integer(), nullable=False),
        sa.Column("object", sa.String(length=10), nullable=False),
        sa.Column("method", sa.String(length=30), nullable=False),
        sa.Column("ranking", sa.JSON(), nullable=False),
        sa.Column("chosen", sa.JSON(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=True),
        sa.Column("job_id", sa.String(length=36), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["cell_line_id"], ["cell_lines.id"], name=op.f("fk_channel_sets_cell_line_id_cell_lines")
        ),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], name=op.f("fk_channel_sets_dataset_id_datasets")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_channel_sets_job_id_jobs")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_channel_sets")),
    )
    with op.batch_alter_table("channel_sets", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_channel_sets_cell_line_id"), ["cell_line_id"], unique=False)

    op.create_table(
        "dataset_images",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("image_sha256", sa.String(length=64), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("n_channels", sa.Integer(), nullable=False),
        sa.Column("nuclei_sha256", sa.String(length=64), nullable=True),
        sa.Column("cells_sha256", sa.String(length=64), nullable=True),
        sa.Column("plate", sa.String(length=120), nullable=True),
        sa.Column("well", sa.String(length=16), nullable=True),
        sa.Column("field", sa.Integer(), nullable=True),
        sa.Column("split", sa.String(length=10), nullable=True),
        sa.ForeignKeyConstraint(
            ["dataset_id"], ["datasets.id"], name=op.f("fk_dataset_images_dataset_id_datasets"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dataset_images")),
    )
    with op.batch_alter_table("dataset_images", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_dataset_images_dataset_id"), ["dataset_id"], unique=False)

    op.create_table(
        "job_results",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("media_type", sa.String(length=100), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_job_results_job_id_jobs"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_results")),
        sa.UniqueConstraint("job_id", "name", name=op.f("uq_job_results_job_id_name")),
    )
    with op.batch_alter_table("job_results", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_job_results_job_id"), ["job_id"], unique=False)

    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cell_line_id", sa.Integer(), nullable=False),
        sa.Column("reporter_id", sa.Integer(), nullable=False),
        sa.Column("object", sa.String(length=10), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=12), nullable=False),
        sa.Column("base_model_id", sa.Integer(), nullable=True),
        sa.Column("parent_version_id", sa.Integer(), nullable=True),
        sa.Column("dataset_id", sa.Integer(), nullable=True),
        sa.Column("job_id", sa.String(length=36), nullable=True),
        sa.Column("training_params", sa.JSON(), nullable=False),
        sa.Column("weights_sha256", sa.String(length=64), nullable=True),
        sa.Column("card", sa.JSON(), nullable=False),
        sa.Column("diameter", sa.Float(), nullable=True),
        sa.Column("test_metrics", sa.JSON(), nullable=False),
        sa.Column("training_curve", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["base_model_id"], ["base_models.id"], name=op.f("fk_model_versions_base_model_id_base_models")
        ),
        sa.ForeignKeyConstraint(
            ["cell_line_id"], ["cell_lines.id"], name=op.f("fk_model_versions_cell_line_id_cell_lines")
        ),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"], name=op.f("fk_model_versions_dataset_id_datasets")),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], name=op.f("fk_model_versions_job_id_jobs")),
        sa.ForeignKeyConstraint(
            ["parent_version_id"],
            ["model_versions.id"],
            name=op.f("fk_model_versions_parent_version_id_model_versions"),
        ),
        sa.ForeignKeyConstraint(
            ["reporter_id"], ["reporters.id"], name=op.f("fk_model_versions_reporter_id_reporters")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint(
            "cell_line_id",
            "reporter_id",
            "object",
            "version",
            name=op.f("uq_model_versions_cell_line_id_reporter_id_object_version"),
        ),
    )
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_versions_cell_line_id"), ["cell_line_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_model_versions_reporter_id"), ["reporter_id"], unique=False)

    op.create_table(
        "model_aliases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cell_line_id", sa.Integer(), nullable=False),
        sa.Column("reporter_id", sa.Integer(), nullable=False),
        sa.Column("object", sa.String(length=10), nullable=False),
        sa.Column("alias", sa.String(length=60), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["cell_line_id"], ["cell_lines.id"], name=op.f("fk_model_aliases_cell_line_id_cell_lines")
        ),
        sa.ForeignKeyConstraint(
            ["model_version_id"], ["model_versions.id"], name=op.f("fk_model_aliases_model_version_id_model_versions")
        ),
        sa.ForeignKeyConstraint(["reporter_id"], ["reporters.id"], name=op.f("fk_model_aliases_reporter_id_reporters")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_aliases")),
        sa.UniqueConstraint(
            "cell_line_id",
            "reporter_id",
            "object",
            "alias",
            name=op.f("uq_model_aliases_cell_line_id_reporter_id_object_alias"),
        ),
    )
    op.create_table(
        "alias_moves",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("alias_id", sa.Integer(), nullable=False),
        sa.Column("from_version_id", sa.Integer(), nullable=True),
        sa.Column("to_version_id", sa.Integer(), nullable=False),
        sa.Column("forced", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("actor_key_id", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["actor_key_id"], ["api_keys.id"], name=op.f("fk_alias_moves_actor_key_id_api_keys")),
        sa.ForeignKeyConstraint(["alias_id"], ["model_aliases.id"], name=op.f("fk_alias_moves_alias_id_model_aliases")),
        sa.ForeignKeyConstraint(
            ["from_version_id"], ["model_versions.id"], name=op.f("fk_alias_moves_from_version_id_model_versions")
        ),
        sa.ForeignKeyConstraint(
            ["to_version_id"], ["model_versions.id"], name=op.f("fk_alias_moves_to_version_id_model_versions")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alias_moves")),
    )
    with op.batch_alter_table("alias_moves", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_alias_moves_alias_id"), ["alias_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("alias_moves", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_alias_moves_alias_id"))

    op.drop_table("alias_moves")
    op.drop_table("model_aliases")
    with op.batch_alter_table("model_versions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_versions_reporter_id"))
        batch_op.drop_index(batch_op.f("ix_model_versions_cell_line_id"))

    op.drop_table("model_versions")
    with op.batch_alter_table("job_results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_results_job_id"))

    op.drop_table("job_results")
    with op.batch_alter_table("dataset_images", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dataset_images_dataset_id"))

    op.drop_table("dataset_images")
    with op.batch_alter_table("channel_sets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_channel_sets_cell_line_id"))

    op.drop_table("channel_sets")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_status_heartbeat")
        batch_op.drop_index(batch_op.f("ix_jobs_status"))
        batch_op.drop_index(batch_op.f("ix_jobs_kind"))

    op.drop_table("jobs")
    op.drop_table("datasets")
    op.drop_table("worker_heartbeats")
    op.drop_table("reporters")
    op.drop_table("cell_lines")
    op.drop_table("base_models")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_keys_prefix"))

    op.drop_table("api_keys")
