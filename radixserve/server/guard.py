"""ASGI middleware in front of every route: request id, API keys, body size limit, last-resort 500.

Pure ASGI rather than Starlette's BaseHTTPMiddleware: the body limit must count bytes as they arrive
(chunked bodies have no Content-Length), and handlers must see the client's disconnect on `receive`.
"""
from __future__ import annotations

import hmac
import logging
import uuid

from radixserve.server.errors import APIError

logger = logging.getLogger(__name__)


class Guard:
    def __init__(self, app, api_key: str | None, open_paths: set[str], max_body_bytes: int,
                 admin_api_key: str | None = None, admin_paths: set[str] = frozenset(), log_requests: bool = False):
        """Without keys every route is open. api_key guards every route but open_paths; admin_api_key
        (when set) alone opens admin_paths, and passes wherever api_key does."""
        self.app, self.open_paths, self.admin_paths = app, open_paths, admin_paths
        self.api_key = api_key.encode() if api_key else None
        self.admin_api_key = admin_api_key.encode() if admin_api_key else None
        self.max_body_bytes, self.log_requests = max_body_bytes, log_requests

    def _key_error(self, path: str, headers: dict[str, str]) -> APIError | None:
        if path in self.open_paths or not (self.api_key or self.admin_api_key):
            return None
        auth = headers.get("authorization", "")
        key = (auth[7:] if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")).encode()
        # compare_digest: the time taken says nothing about how much of a key was right.
        is_admin = self.admin_api_key is not None and hmac.compare_digest(key, self.admin_api_key)
        if is_admin:
            return None
        if path in self.admin_paths and self.admin_api_key is not None:
            if self.api_key is not None and hmac.compare_digest(key, self.api_key):
                return APIError(403, f"{path} needs the admin API key", code="permission_denied")
            return APIError(401, "invalid or missing admin API key (Authorization: Bearer <key>)",
                            code="invalid_api_key")
        if self.api_key is None or hmac.compare_digest(key, self.api_key):
            return None
        return APIError(401, "invalid or missing API key (Authorization: Bearer <key>)", code="invalid_api_key")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        rid = headers.get("x-request-id") or uuid.uuid4().hex
        scope.setdefault("state", {})["rid"] = rid
        rid_header = (b"x-request-id", rid.encode())
        started = False  # the response has begun
        replaced = False  # the guard answered instead of the app: drop whatever the app still sends
        status = 0

        async def send_with_id(message):
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
                message = {**message, "headers": [*message.get("headers", []), rid_header]}
            await send(message)

        async def reply(error: APIError):
            await error.response()(scope, receive, send_with_id)

        async def app_send(message):
            if not replaced:
                await send_with_id(message)

        path = scope["path"]
        key_error = self._key_error(path, headers)
        if key_error is not None:
            return await reply(key_error)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await reply(self._too_large())

        received = 0

        async def counting_receive():
            # A chunked body has no Content-Length: count it as it arrives, answer 413 as soon as it
            # is too big and tell the app the client is gone.
            nonlocal received, replaced
            message = await receive()
            if message["type"] == "http.request" and not replaced:
                received += len(message.get("body", b""))
                if received > self.max_body_bytes and not started:
                    await reply(self._too_large())
                    replaced = True
            return {"type": "http.disconnect"} if replaced else message

        try:
            await self.app(scope, counting_receive, app_send)
        except Exception:  # a bug: logged with the request id; the server keeps serving
            if replaced:
                return
            logger.exception("request %s failed", rid)
            if not started:
                await reply(APIError(500, f"internal server error (request id {rid})"))
        if self.log_requests:
            logger.info("request %s %s %s -> %d", rid, scope["method"], path, status)

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body exceeds the limit of {self.max_body_bytes} bytes")
