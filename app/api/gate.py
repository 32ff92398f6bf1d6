"""The gate every API request passes before any byte of its body is read.

1. Authentication: a request to ``/api/`` without a valid key gets its 401 from the headers alone,
   so an anonymous client cannot make the server receive, spool or parse a body.
2. Admission of uploads: at most ``max_concurrent_uploads`` bodies (``max_uploads_per_key`` per
   key) and ``max_upload_bytes_in_flight`` bytes are received at once; beyond that the request is
   refused at once (429 for one key's excess, 503 for the server's) with ``Retry-After``.
3. Size: a declared ``Content-Length`` over ``max_request_bytes`` is refused at once; a chunked
   body is counted as it arrives and cut off past the limit (or past the bytes-in-flight budget).

The principal found here is put in ``scope["state"]`` so that the route dependency does not look
the key up a second time.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import anyio
from sqlalchemy.exc import OperationalError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import problem_response
from app.settings import Settings

log = logging.getLogger(__name__)

#: Routes below this prefix all need a key (the page, /health, /ready and the docs do not).
PROTECTED_PREFIX = "/api/"
#: A body this small that is not multipart is a JSON request, not an upload.
SMALL_BODY = 1 << 20
MAX_KEY_LENGTH = 200
PRINCIPAL_STATE = "cellfuse_principal"
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class _Budget:
    """Uploads and bytes in flight, shared by every request of one app (threads and event loop)."""

    def __init__(self, max_uploads: int, max_per_key: int, max_bytes: int):
        self.max_uploads, self.max_per_key, self.max_bytes = max_uploads, max_per_key, max_bytes
        self.uploads = 0
        self.per_key: dict[int, int] = {}
        self.bytes = 0
        self._lock = threading.Lock()

    def admit(self, key_id: int, reserve: int) -> str | None:
        """Take an upload slot and reserve bytes; -> None, or 'key' / 'server' when refused."""
        with self._lock:
            if self.per_key.get(key_id, 0) >= self.max_per_key:
                return "key"
            # An idle server admits any one request the size limit allows, whatever the budget.
            if self.uploads >= self.max_uploads or (self.uploads and self.bytes + reserve > self.max_bytes):
                return "server"
            self.uploads += 1
            self.per_key[key_id] = self.per_key.get(key_id, 0) + 1
            self.bytes += reserve
            return None

    def add(self, n: int) -> bool:
        """Count ``n`` more received bytes of a body of unknown length; False past the budget."""
        with self._lock:
            if self.bytes + n > self.max_bytes:
                return False
            self.bytes += n
            return True

    def release(self, key_id: int, held: int) -> None:
        with self._lock:
            self.uploads -= 1
            self.per_key[key_id] -= 1
            if not self.per_key[key_id]:
                del self.per_key[key_id]
            self.bytes -= held


class RequestGate:
    def __init__(self, app: ASGIApp, settings: Settings):
        self.app = app
        self.settings = settings
        self.max_bytes = settings.max_request_bytes
        self.budget = _Budget(
            settings.max_concurrent_uploads, settings.max_uploads_per_key, settings.max_upload_bytes_in_flight
        )

    # -- refusals ------------------------------------------------------------------------------

    async def _refuse(
        self,
        scope: Scope,
        send: Send,
        status: int,
        detail: str,
        slug: str,
        headers: dict[str, str] | None = None,
        **extensions: Any,
    ) -> None:
        response = problem_response(
            None, status, detail, slug=slug, headers=headers, instance=scope.get("path", ""), **extensions
        )
        await response(scope, _empty_receive, send)

    def _too_large(self) -> tuple[int, str, str, dict[str, Any]]:
        return (
            413,
            (
                f"the request body is larger than the limit of {self.max_bytes} bytes; send fewer or "
                "smaller files per request"
            ),
            "request-too-large",
            {"limit_bytes": self.max_bytes},
        )

    @staticmethod
    def _busy(scope_of_refusal: str) -> tuple[int, str, str, dict[str, Any]]:
        if scope_of_refusal == "key":
            return (
                429,
                ("this key already has as many uploads in progress as allowed; wait for one to finish"),
                "too-many-uploads",
                {},
            )
        return (
            503,
            "the server is receiving as many uploads as it can hold right now; retry shortly",
            "uploads-busy",
            {},
        )

    # -- authentication ------------------------------------------------------------------------

    def _lookup(self, key: str):
        from app.db import session_factory
        from app.security import authenticate

        with session_factory(self.settings.resolved_database_url)() as session:
            return authenticate(session, key)

    async def _authenticate(self, scope: Scope, send: Send, headers: dict[bytes, bytes]):
        raw = headers.get(b"x-api-key", b"")
        challenge = {"WWW-Authenticate": "APIKey"}
        if not raw:
            await self._refuse(
                scope, send, 401, "this endpoint needs an API key in the X-API-Key header", "missing-api-key", challenge
            )
            return None
        key = raw.decode("latin-1")
        principal = None
        if len(key) <= MAX_KEY_LENGTH and key.isascii() and key.isprintable():
            try:
                principal = await anyio.to_thread.run_sync(self._lookup, key)
            except OperationalError:
                log.warning("database unavailable while checking an API key", exc_info=True)
                await self._refuse(
                    scope,
                    send,
                    503,
                    "the database is not reachable right now; retry shortly",
                    "database-unavailable",
                    {"Retry-After": "5"},
                )
                return None
        if principal is None:
            await self._refuse(
                scope, send, 401, "the API key is unknown or has been revoked", "invalid-api-key", challenge
            )
        return principal

    # -- the gate ------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        principal = None
        if scope.get("path", "").startswith(PROTECTED_PREFIX):
            principal = await self._authenticate(scope, send, headers)
            if principal is None:
                return
            scope.setdefault("state", {})[PRINCIPAL_STATE] = principal
        if scope.get("method") not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        declared: int | None = None
        if b"content-length" in headers:
            try:
                declared = int(headers[b"content-length"])
            except ValueError:
                declared = None  # the server refuses malformed lengths itself
        if declared is not None and declared > self.max_bytes:
            status, detail, slug, ext = self._too_large()
            await self._refuse(scope, send, status, detail, slug, **ext)
            return
        content_type = headers.get(b"content-type", b"").lower()
        is_upload = content_type.startswith(b"multipart/") or declared is None or declared > SMALL_BODY
        if not is_upload:
            await self._pass_counted(scope, receive, send, None, 0)
            return
        key_id = principal.key_id if principal is not None else -1
        reserve = declared or 0
        refused = self.budget.admit(key_id, reserve)
        if refused is not None:
            status, detail, slug, ext = self._busy(refused)
            await self._refuse(scope, send, status, detail, slug, {"Retry-After": "5"}, **ext)
            return
        held = [reserve]
        try:
            await self._pass_counted(scope, receive, send, None if declared is not None else held, reserve)
        finally:
            self.budget.release(key_id, held[0])

    async def _pass_counted(
        self, scope: Scope, receive: Receive, send: Send, held: list[int] | None, reserved: int
    ) -> None:
        """Run the app, counting the body; past a limit the app sees a disconnect and the client a refusal.

        ``held`` (bodies of unknown length) accumulates the bytes charged to the in-flight budget.
        """
        received = 0
        refusal: tuple[int, str, str, dict[str, Any]] | None = None
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received, refusal
            message = await receive()
            if message["type"] == "http.request":
                n = len(message.get("body", b""))
                received += n
                if received > self.max_bytes:
                    refusal = self._too_large()
                elif held is not None:
                    if self.budget.add(n):
                        held[0] += n
                    else:
                        refusal = self._busy("server")
                if refusal is not None:
                    # Stop the body here: the app sees a disconnect, never the excess bytes.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refusal is not None:
                if not response_started and message["type"] == "http.response.start":
                    response_started = True
                    await self._send_refusal(scope, send, refusal)
                return  # the app's own answer to the cut-off body is replaced by the refusal
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if refusal is None:
                raise
        if refusal is not None and not response_started:
            await self._send_refusal(scope, send, refusal)

    async def _send_refusal(self, scope: Scope, send: Send, refusal: tuple[int, str, str, dict[str, Any]]) -> None:
        status, detail, slug, ext = refusal
        headers = {"Retry-After": "5"} if status in (429, 503) else None
        await self._refuse(scope, send, status, detail, slug, headers, **ext)


async def _empty_receive() -> Message:
    return {"type": "http.disconnect"}
