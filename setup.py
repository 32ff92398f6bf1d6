"""Packaging hook (the metadata is in pyproject.toml): a wheel ships the Alembic scripts.

The repository keeps them at the top level (``alembic/``, ``alembic.ini``); a built wheel carries a copy
as ``app/_alembic`` so that ``cellfuse migrate`` and ``cellfuse serve`` work from a non-editable install.
An editable install reads the repository's ``alembic/`` directly (see ``app.migrations``).
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithMigrations(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "app" / "_alembic"
        shutil.rmtree(target, ignore_errors=True)  # a reused build/ must not keep a deleted revision
        shutil.copytree("alembic", target, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # Inside the package the ini sits next to env.py, so the scripts are "here".
        ini = Path("alembic.ini").read_text().replace("script_location = alembic", "script_location = %(here)s")
        (target / "alembic.ini").write_text(ini.replace("prepend_sys_path = .\n", ""))


setup(cmdclass={"build_py": BuildPyWithMigrations})
