"""Security headers on every response: the page and the API.

The page loads only same-origin scripts, styles and images (no inline script or style); its images
are ``blob:`` URLs made from authenticated downloads. ``/docs`` is Swagger UI served from the package
with a same-origin start script, so it gets the page's policy too. ReDoc (``/redoc``) still loads from
a CDN with an inline bootstrap script: frame protection and ``nosniff``, no Content-Security-Policy.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
#: API answers are data, never documents to render.
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
DOCS_PATHS = ("/redoc",)

COMMON = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}


def csp_for(path: str) -> str | None:
    if path.startswith(DOCS_PATHS):
        return None
    if path in ("/", "/docs") or path.startswith("/static/"):
        return PAGE_CSP
    return API_CSP


class SecurityHeaders:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        csp = csp_for(scope.get("path", ""))

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in COMMON.items():
                    if name not in headers:
                        headers[name] = value
                if csp and "content-security-policy" not in headers:
                    headers["Content-Security-Policy"] = csp
            await send(message)

        await self.app(scope, receive, with_headers)
