"""Install artefacts: the lock file covers pyproject.toml, and a built wheel runs its migrations.

A non-editable install must not depend on the repository: the wheel carries the Alembic scripts
(``app/_alembic``, copied by setup.py), the web page and the shipped zoo, and ``migrate`` runs from it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO_ROOT = Path(__file__).resolve().parent.parent


def _locked() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith((" ", "#", "-")):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_lock_pins_every_dependency_within_its_range():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = _locked()
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    stale = []
    for spec in map(Requirement, wanted):
        pinned = pins.get(canonicalize_name(spec.name))
        if pinned is None or not spec.specifier.contains(pinned, prereleases=True):
            stale.append(f"{spec} (lock: {pinned})")
    assert not stale, f"requirements.lock is stale, run scripts/lock.sh: {stale}"
    # Any torch 2.13.0 build satisfies it (CPU here, CUDA in the worker image), and no CUDA wheels ride along.
    assert pins["torch"] == "2.13.0"
    assert not [name for name in pins if name.startswith("nvidia-") or name == "triton"]


def test_readme_and_ci_install_from_the_lock_and_run_the_same_tests():
    """The README's two commands and .ci/run install torch 2.13.0, then the lock, then CellFuse
    without resolving anything else; CI runs the README's test command verbatim."""
    readme = (REPO_ROOT / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    install, test = (line.split("#", 1)[0].strip() for line in block.strip().splitlines())
    steps = [step.strip() for step in install.split("&&")]
    assert steps[:3] == ["pip install torch==2.13.0", "pip install -r requirements.lock", "pip install --no-deps -e ."]
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    ci_installs = re.findall(r"^python3 -m pip install -q (.+)$", ci, flags=re.M)
    assert ci_installs == ["torch==2.13.0", "-r requirements.lock", "--no-deps -e ."]
    assert ci.rstrip().splitlines()[-1] == test
    assert re.search(r"^python3 -m ruff check \.$", ci, flags=re.M) and re.search(r"^python3 -m mypy$", ci, flags=re.M)


VENDOR = REPO_ROOT / "app" / "api" / "web" / "vendor"
#: Each third-party package's licence files, which VENDOR.md names and which must ship beside its code.
LICENCES = ["openseadragon/LICENSE.txt", "swagger-ui/LICENSE", "swagger-ui/NOTICE"]


def _vendored() -> list[str]:
    """The third-party files the web page serves (paths under vendor/) with VENDOR.md and the licences."""
    return sorted({*_vendor_checksums(), *LICENCES, "VENDOR.md"})


def _vendor_checksums() -> dict[str, str]:
    record = (VENDOR / "VENDOR.md").read_text()
    block = record.split("SHA-256 of the copied code:")[1].split("```")[1]
    return {path: digest for digest, path in (line.split() for line in block.strip().splitlines())}


def test_vendored_assets_match_their_record_and_keep_their_licences():
    """VENDOR.md's checksums are those of the files served (an upgrade updates both), every
    served third-party script or style sheet is recorded, and each package's licence is kept."""
    import hashlib

    recorded = _vendor_checksums()
    served = {str(p.relative_to(VENDOR)) for p in VENDOR.rglob("*") if p.suffix in (".js", ".css")}
    assert served == set(recorded), served ^ set(recorded)
    for path, digest in recorded.items():
        assert hashlib.sha256((VENDOR / path).read_bytes()).hexdigest() == digest, path
    for licence in LICENCES:
        assert (VENDOR / licence).is_file() and licence in (VENDOR / "VENDOR.md").read_text(), licence
    table = (VENDOR / "VENDOR.md").read_text()
    for package in ("`openseadragon` | 6.1.1", "`swagger-ui-dist` | 5.35.0"):
        assert package in table, package


@pytest.mark.slow
def test_wheel_ships_migrations_and_web_page_and_migrates_outside_the_repo(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(dist),
            str(REPO_ROOT),
        ],
        check=True,
        cwd=tmp_path,
        timeout=600,
    )
    [wheel] = dist.glob("cellfuse-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    revisions = {p.name for p in (REPO_ROOT / "alembic" / "versions").glob("*.py")}
    assert revisions and {f"app/_alembic/versions/{r}" for r in revisions} <= names
    assert {
        "app/_alembic/env.py",
        "app/_alembic/script.py.mako",
        "app/_alembic/alembic.ini",
        "app/api/web/index.html",
        "app/api/web/js/api.js",
        *(f"app/api/web/vendor/{name}" for name in _vendored()),
    } <= names
    assert any(n.startswith("models_zoo/weights/") and n.endswith(".safetensors") for n in names)

    # Unpacked where the repository is not importable: migrate must find its scripts in the package.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "empty"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "CELLFUSE_DATA_DIR": str(work / "data")}
    env.pop("CELLFUSE_DATABASE_URL", None)
    code = (
        "import app, app.migrations as m, app.settings as s; "
        "print(app.__file__, m.script_location()); m.upgrade(s.Settings().resolved_database_url)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert str(site / "app") in out.stdout and "_alembic" in out.stdout
    assert (work / "data" / "cellfuse.sqlite").is_file()
