"""Request-size limit as plain ASGI middleware, so an oversized body is refused before it is parsed."""

from __future__ import annotations

import json

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """Raised while the body streams in; FastAPI turns an HTTPException met during body parsing into
    its response instead of a generic 400."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, detail=f"Request body too large: this endpoint accepts at most {limit} bytes.")


class BodySizeLimit:
    def __init__(self, app: ASGIApp, default_limit: int, admin_limit: int, admin_prefix: str = "/api/v1/admin/"):
        self.app = app
        self.default_limit = default_limit
        self.admin_limit = admin_limit
        self.admin_prefix = admin_prefix

    async def _refuse(self, send: Send, limit: int) -> None:
        body = json.dumps({"detail": f"Request body too large: this endpoint accepts at most {limit} bytes."}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        limit = self.admin_limit if path.startswith(self.admin_prefix) else self.default_limit
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > limit:
                    await self._refuse(send, limit)
                    return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            # A chunked body without Content-Length that outgrew the limit while being read.
            if not started:
                await self._refuse(send, limit)
