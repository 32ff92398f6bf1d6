"""The web page for lab people: one static HTML page, its ES modules, its style sheet, and the
vendored viewer and API documentation (see web/vendor/VENDOR.md).

The page itself is public (it holds no data); every API call it makes carries the user's key.
Everything is served from this package: no CDN, no build step, no external fonts, no inline script
(so that a Content-Security-Policy of same-origin scripts and styles holds).
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.api.errors import Problem

router = APIRouter(prefix="", tags=["web"])

WEB_DIR = Path(__file__).resolve().parents[1] / "web"

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".txt": "text/plain; charset=utf-8",
}
#: A path below web/: plain names (letters, digits, - _ .) in at most three folders, no dot-files.
_SAFE_PATH = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]*/){0,3}[A-Za-z0-9][A-Za-z0-9_.-]*$")

# The page is small and changes with the release; revalidating each time keeps a stale script from
# talking to a newer API after an upgrade.
_CACHE = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def _static(name: str) -> FileResponse:
    # Only files under the web folder, by plain names: no "..", no dot-files, no path tricks.
    path = WEB_DIR / name
    if (
        not _SAFE_PATH.match(name)
        or ".." in name
        or path.suffix not in _MEDIA_TYPES
        or not path.resolve().is_relative_to(WEB_DIR)
        or not path.is_file()
    ):
        raise Problem(404, f"no page file named {name!r}", slug="not-found")
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=_CACHE)


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    return _static("index.html")


@router.get("/favicon.ico", include_in_schema=False)
def favicon() -> FileResponse:
    return _static("favicon.svg")


@router.get("/docs", include_in_schema=False)
def docs() -> FileResponse:
    """Swagger UI from the package (FastAPI's default loads it from a CDN and runs an inline script)."""
    return _static("docs.html")


@router.get("/static/{name:path}", include_in_schema=False)
def static_file(name: str) -> FileResponse:
    return _static(name)
