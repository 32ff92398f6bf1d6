"""Migrations upgrade and downgrade on SQLite and on PostgreSQL."""

import pytest
from sqlalchemy import inspect

from app.db import Base, make_engine
from app.migrations import current_revision, downgrade, upgrade

CORE_TABLES = {
    "cell_lines",
    "reporters",
    "datasets",
    "dataset_images",
    "base_models",
    "model_versions",
    "model_aliases",
    "alias_moves",
    "channel_sets",
    "jobs",
    "job_results",
    "api_keys",
    "worker_heartbeats",
    "evaluations",
}


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _round_trip(url: str) -> None:
    upgrade(url)
    assert current_revision(url) is not None
    assert CORE_TABLES <= _tables(url)
    # The migrations create exactly what the models declare (no drift between them).
    assert set(Base.metadata.tables) <= _tables(url)
    downgrade(url, "base")
    assert current_revision(url) is None
    assert not (CORE_TABLES & _tables(url))
    upgrade(url)
    assert CORE_TABLES <= _tables(url)


def test_migrations_round_trip_on_sqlite(tmp_path):
    _round_trip(f"sqlite:///{tmp_path / 'm.sqlite'}")


@pytest.mark.services
def test_migrations_round_trip_on_postgresql(pg_url):
    _round_trip(pg_url)


def test_models_match_migrations(tmp_path):
    """Alembic's autogenerate finds nothing to add after upgrading: models and migrations agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    url = f"sqlite:///{tmp_path / 'd.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []
