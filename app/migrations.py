"""Bring a database to the newest schema with Alembic (used by `cellfuse serve` and `migrate`)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

REPO_ROOT = Path(__file__).resolve().parent.parent
#: A wheel ships the scripts inside the package (setup.py copies them there); a source checkout and an
#: editable install use the repository's top-level alembic/. (In site-packages, ../alembic is the
#: Alembic library itself, hence the env.py check.)
PACKAGED_SCRIPTS = Path(__file__).resolve().parent / "_alembic"


def script_location() -> Path:
    return PACKAGED_SCRIPTS if (PACKAGED_SCRIPTS / "env.py").is_file() else REPO_ROOT / "alembic"


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(script_location()))
    # Alembic's config is an INI parser: a literal % in a password must be doubled.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    if database_url.startswith("sqlite:///"):
        Path(database_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(database_url), revision)


def current_revision(database_url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    from app.db import make_engine

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()
