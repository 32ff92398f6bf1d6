"""Layering rules, checked in fresh interpreters."""

import subprocess
import sys

from tests.service.conftest import REPO_ROOT


def _modules_after(import_stmt: str) -> set[str]:
    code = f"import sys; {import_stmt}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True, timeout=120)
    return {line.split(".")[0] for line in out.stdout.split()}


def test_api_does_not_import_torch_or_cellpose():
    loaded = _modules_after("from app.api.main import create_app; create_app()")
    assert "fastapi" in loaded  # the import really happened
    assert "torch" not in loaded
    assert "cellpose" not in loaded


def test_science_core_imports_no_framework():
    stmt = "; ".join(
        f"import app.science.{m}" for m in ("metrics", "imageio", "synthetic", "backbone", "flow_fusion")
        if (REPO_ROOT / "app" / "science" / f"{m}.py").exists()
    )
    loaded = _modules_after(stmt)
    assert "numpy" in loaded
    for framework in ("fastapi", "celery", "sqlalchemy", "starlette", "kombu"):
        assert framework not in loaded, framework
