"""Layering rules, checked in fresh interpreters."""

import subprocess
import sys

from tests.service.conftest import REPO_ROOT


def _modules_after(import_stmt: str) -> set[str]:
    code = f"import sys; {import_stmt}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    return {line.split(".")[0] for line in out.stdout.split()}


def test_api_does_not_import_torch_or_cellpose():
    loaded = _modules_after("from app.api.main import create_app; create_app()")
    assert "fastapi" in loaded  # the import really happened
    assert "torch" not in loaded
    assert "cellpose" not in loaded


def test_science_core_imports_no_framework_and_nothing_else_from_app():
    modules = sorted(p.stem for p in (REPO_ROOT / "app" / "science").glob("*.py") if p.stem != "__init__")
    stmt = "; ".join(f"import app.science.{m}" for m in modules)
    code = f"import sys; {stmt}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=180
    ).stdout.split()
    assert {"numpy", "torch", "cellpose"} <= {name.split(".")[0] for name in out}
    for framework in ("fastapi", "celery", "sqlalchemy", "starlette", "kombu", "pydantic_settings"):
        assert framework not in {name.split(".")[0] for name in out}, framework
    outside = [name for name in out if name.startswith("app.") and not name.startswith("app.science")]
    assert outside == [], outside
    assert len(modules) >= 15


def test_light_science_modules_do_not_import_torch():
    """The API validates uploads and writes exports with these: they must stay torch-free."""
    loaded = _modules_after(
        "import app.science.image_files, app.science.metrics, app.science.synthetic, "
        "app.science.exports, app.science.flow_fusion"
    )
    assert "numpy" in loaded and "torch" not in loaded and "cellpose" not in loaded


def test_no_module_under_app_imports_workers():
    """The producer side lives in app/ (app.queue); workers/ depends on app/, never the reverse."""
    import ast

    offenders = []
    for path in sorted((REPO_ROOT / "app").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(REPO_ROOT)}: {n}" for n in names if n.split(".")[0] == "workers"]
    assert len(list((REPO_ROOT / "app").rglob("*.py"))) > 50  # the walk really saw the package
    assert offenders == []
