"""A request-body size limit enforced before the body is read (multipart parsing spools to disk).

A declared ``Content-Length`` over the limit is refused at once; a chunked body is counted as it
arrives and cut off when it passes the limit, so no client can make the server store more than the
limit in a temporary file.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.errors import problem_response


class BodyTooLarge(Exception):
    pass


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    def _refusal(self, scope: Scope):
        return problem_response(
            None, 413, f"the request body is larger than the limit of {self.max_bytes} bytes; "
            "send fewer or smaller files per request", slug="request-too-large", limit_bytes=self.max_bytes,
            instance=scope.get("path", ""))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_large = int(declared) > self.max_bytes
            except ValueError:
                too_large = False  # the server refuses malformed lengths itself
            if too_large:
                await self._refusal(scope)(scope, receive, send)
                return
        received = 0
        exceeded = False
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    # Stop the body here: the app sees a disconnect, never the excess bytes.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if exceeded:
                if not response_started and message["type"] == "http.response.start":
                    response_started = True
                    await self._refusal(scope)(scope, _empty_receive, send)
                return  # the app's own answer to the cut-off body is replaced by the 413
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not response_started:
            await self._refusal(scope)(scope, _empty_receive, send)


async def _empty_receive() -> Message:
    return {"type": "http.disconnect"}
