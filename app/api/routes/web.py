"""The web page for lab people: one static HTML page, its script and its style sheet.

The page itself is public (it holds no data); every API call it makes carries the user's key.
Everything is served from this package: no CDN, no build step, no external fonts.
"""

from __future__ import annotations

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
}

# The page is small and changes with the release; revalidating each time keeps a stale script from
# talking to a newer API after an upgrade.
_CACHE = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def _static(name: str) -> FileResponse:
    # Only plain file names from the web folder: no sub-folders, no dot-files, no path tricks.
    path = WEB_DIR / name
    if "/" in name or "\\" in name or name.startswith(".") or path.suffix not in _MEDIA_TYPES or not path.is_file():
        raise Problem(404, f"no page file named {name!r}", slug="not-found")
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=_CACHE)


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    return _static("index.html")


@router.get("/static/{name}", include_in_schema=False)
def static_file(name: str) -> FileResponse:
    return _static(name)
