"""RFC 9457 problem details for every error the API returns.

Routes raise :class:`Problem` (or let a known library error through); the handlers here turn it,
validation errors, HTTP errors and unexpected exceptions into ``application/problem+json``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.storage import StorageError, UploadTooLarge, disk_full_error
from app.zoo import ZooError

log = logging.getLogger(__name__)

PROBLEM_MEDIA_TYPE = "application/problem+json"
PROBLEM_BASE = "https://cellfuse.org/problems/"

_TITLES = {
    400: "Bad request",
    401: "Not authenticated",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    406: "Not acceptable",
    409: "Conflict",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Invalid request",
    429: "Too many requests",
    500: "Internal error",
    503: "Service unavailable",
    507: "Insufficient storage",
}


class Problem(Exception):
    def __init__(
        self,
        status: int,
        detail: str,
        *,
        slug: str | None = None,
        title: str | None = None,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.slug = slug or _TITLES.get(status, "error").lower().replace(" ", "-")
        self.title = title or _TITLES.get(status, "Error")
        self.headers = headers
        self.extensions = extensions


def problem_response(
    request: Request | None,
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": PROBLEM_BASE + (slug or _TITLES.get(status, "error").lower().replace(" ", "-")),
        "title": title or _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if request is not None:
        body["instance"] = request.url.path
    body.update(extensions)
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    errors = []
    for err in exc.errors():
        errors.append(
            {
                "location": ".".join(str(p) for p in err.get("loc", ())),
                "message": err.get("msg", "invalid"),
                "type": err.get("type", "value_error"),
            }
        )
    return errors


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def _problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(
            request, exc.status, exc.detail, slug=exc.slug, title=exc.title, headers=exc.headers, **exc.extensions
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = _validation_errors(exc)
        summary = "; ".join(f"{e['location']}: {e['message']}" for e in errors[:5])
        return problem_response(
            request, 422, f"the request is not valid: {summary}", slug="validation-error", errors=errors
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else _TITLES.get(exc.status_code, "error")
        return problem_response(request, exc.status_code, detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(ZooError)
    async def _zoo(request: Request, exc: ZooError) -> JSONResponse:
        return problem_response(request, exc.status, str(exc), slug=exc.slug)

    @app.exception_handler(UploadTooLarge)
    async def _too_large(request: Request, exc: UploadTooLarge) -> JSONResponse:
        return problem_response(request, 413, str(exc), slug="upload-too-large", limit_bytes=exc.limit)

    @app.exception_handler(StorageError)
    async def _storage(request: Request, exc: StorageError) -> JSONResponse:
        log.error("storage error: %s", exc)
        return problem_response(
            request, 507, exc.strerror or "the data directory cannot take the write", slug="storage-unavailable"
        )

    @app.exception_handler(DataError)
    async def _unstorable(request: Request, exc: DataError) -> JSONResponse:
        # A value the database refuses (validation should have caught it): a 4xx, never a 500.
        log.warning("database refused a value on %s: %s", request.url.path, exc.orig)
        return problem_response(
            request,
            422,
            "a value in the request cannot be stored (NUL characters, unpaired "
            "surrogates, NaN and out-of-range numbers are refused)",
            slug="unstorable-value",
        )

    @app.exception_handler(OperationalError)
    async def _database(request: Request, exc: OperationalError) -> JSONResponse:
        if (full := disk_full_error(exc)) is not None:  # SQLite on a full disk: storage, not an outage
            log.error("database write failed: the disk is full (%s)", exc.orig)
            return problem_response(request, 507, full.strerror or "the disk is full", slug="storage-unavailable")
        log.warning("database unavailable: %s", exc)
        return problem_response(
            request,
            503,
            "the database is not reachable right now; retry shortly",
            slug="database-unavailable",
            headers={"Retry-After": "5"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # exc_info from the argument: an exception handler need not run inside the except block.
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return problem_response(request, 500, "an unexpected error occurred; it has been logged", slug="internal-error")
