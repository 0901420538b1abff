"""Refuse oversized request bodies before they cost anything.

A body whose Content-Length is over the limit is answered 413 at once, without reading it;
a chunked body is read here up to the limit and refused the moment it passes it. Either
way no JSON parsing, no database and no node ever sees it, so one huge request does not
slow anyone else down. The answer is OpenAI's error body.
"""

from __future__ import annotations

import json

from coordinator.errors import APIError


class BodyTooLarge(APIError):
    status_code = 413
    type = "invalid_request_error"
    code = "request_too_large"


class BodyLimit:
    """ASGI middleware: at most `max_bytes` of request body per HTTP request (`paths`: other
    limits for exact paths, e.g. file uploads)."""

    def __init__(self, app, max_bytes: int, paths: dict[str, int] | None = None):
        self.app, self.default_bytes, self.paths = app, max_bytes, paths or {}

    def _message(self, max_bytes: int) -> str:
        return f"the request body is larger than this market's limit of {max_bytes} bytes"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes = self.paths.get(scope.get("path", ""), self.default_bytes)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit():
            if int(length) > max_bytes:
                return await self._refuse(send, max_bytes)
            return await self.app(scope, receive, send)
        # No length given (chunked): read it here, up to the limit, then hand it on.
        messages, seen = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            seen += len(message.get("body", b""))
            if seen > max_bytes:
                return await self._refuse(send, max_bytes)
            if not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, send, max_bytes: int) -> None:
        body = json.dumps(BodyTooLarge(self._message(max_bytes)).body()).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
