"""WebSocket transport: ``GET /ws/admin/quotas`` (``?last_seq=N``, ``?types=a,b``).

Everything a stranger could be refused for is decided before the upgrade by the admission
shared with SSE (:func:`quotaserver.handlers.admission.admit`), and a refusal is answered
with its HTTP status and JSON envelope: never a 101 for a stranger. Client messages are
at most 64 KiB (Tornado closes with 1009 beyond), rate-limited by a token bucket and
validated; abuse closes the connection with 1008.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import tornado.websocket
from tornado.iostream import StreamClosedError

from ..realtime.hub import Client
from ..realtime.messages import (
    CLIENT_TYPES,
    CLOSE_POLICY,
    CLOSE_UNSUPPORTED,
    Message,
    error_message,
)
from .admission import Refusal, admit
from .base import (
    VIEWER,
    ApiError,
    error_envelope,
    log_handler_exception,
    parse_json,
    request_summary,
    security_headers,
)
from .rawwrite import RawStream, raw_stream, send
from .streams import ascii_cursor, parse_types

if TYPE_CHECKING:
    from ..app import QuotaApp

log = logging.getLogger(__name__)

MAX_BAD_MESSAGES = 5


class WebSocketClient(Client):
    transport = "websocket"
    expects_pong = True

    def __init__(self, handler: AdminSocketHandler, identity: Any, types: Any):
        super().__init__(identity.key if identity else "anonymous", types)
        self.handler = handler
        self.session_id = identity.session_id if identity else None
        self.token_id = identity.token_id if identity else None
        # Decided at the first write: the connection's framing does not change after open.
        self._raw: RawStream | None | bool = False

    def write(self, message: Message) -> asyncio.Future | None:
        conn = self.handler.ws_connection
        if conn is None or conn.is_closing():
            raise tornado.websocket.WebSocketClosedError()
        raw = self._raw
        if raw is False:
            raw = self._raw = raw_stream(self.handler)
        if raw is None:  # the public path: re-encoded and framed per client, same bytes
            return self.handler.write_message(message.text)
        # The frame was built once for every client (Message.ws_frame); write_message would
        # re-encode, re-frame and wrap each write in a Task.
        try:
            return send(raw.stream, message.ws_frame)
        except StreamClosedError:
            raise tornado.websocket.WebSocketClosedError() from None

    def close(self, code: int, reason: str) -> None:
        self.handler.close(code, reason)


class AdminSocketHandler(tornado.websocket.WebSocketHandler):
    """The live admin stream over WebSocket."""

    roles = VIEWER

    def roles_for(self, method: str) -> frozenset[str] | None:
        return self.roles

    def initialize(self, app: QuotaApp) -> None:
        self.app = app
        self.client: WebSocketClient | None = None
        self.identity = None
        self._bad = 0
        self._rate = float(app.config["auth.ws_message_rate"])
        self._burst = float(app.config["auth.ws_message_burst"])
        self._tokens = self._burst
        self._last = time.monotonic()

    def set_default_headers(self) -> None:
        security_headers(self)

    def _request_summary(self) -> str:
        return request_summary(self)

    def log_exception(self, typ: Any, value: Any, tb: Any) -> None:
        log_handler_exception(self, typ, value, tb)

    def _refuse(self, refusal: Refusal) -> None:
        """A refused handshake: the same status, headers and envelope as SSE's."""
        status, headers, body = error_envelope(refusal, refusal.status, "")
        self.set_status(status)
        for name, value in headers.items():
            self.set_header(name, value)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(body))

    async def get(self, *args: Any, **kwargs: Any) -> None:
        result = admit(self.app, self, self.roles)
        if isinstance(result, Refusal):
            return self._refuse(result)
        self.identity, self._types = result.identity, result.types
        await super().get(*args, **kwargs)

    def check_origin(self, origin: str) -> bool:
        scheme = self.request.protocol
        return self.app.auth.origin_allowed(origin, self.request.host, scheme)

    def open(self, *args: Any, **kwargs: Any) -> None:
        if self.identity is not None and not self.app.auth.still_valid(self.identity):
            # Revoked or logged out while the handshake was answered.
            self.close(CLOSE_POLICY, "credentials revoked")
            return
        self.client = WebSocketClient(self, self.identity, self._types)
        self.app.hub.register(self.client)
        cursor = ascii_cursor(self.get_query_argument("last_seq", None))
        task = asyncio.ensure_future(self.app.hub.attach(self.client, cursor))
        self.app.track(task)

    def on_pong(self, data: bytes) -> None:
        if self.client is not None:
            self.client.seen()

    def on_message(self, message: str | bytes) -> None:
        if self.client is None or self.client.closed or self._closing:
            # Frames the peer pipelined after we closed: answering them would raise, and
            # Tornado would then abort the TCP stream before our close frame is read.
            return
        self.client.seen()
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1:
            self.close(CLOSE_POLICY, "too many messages")
            return
        self._tokens -= 1
        if isinstance(message, bytes):
            self.close(CLOSE_UNSUPPORTED, "binary messages are not supported")
            return
        try:
            data = parse_json(message)
        except ValueError:
            return self._bad_message("invalid_json", "messages must be JSON objects")
        if not isinstance(data, dict) or data.get("type") not in CLIENT_TYPES:
            return self._bad_message("unknown_type", "expected subscribe, ping or pong")
        kind = data["type"]
        if kind == "subscribe":
            raw = data.get("types")
            if not isinstance(raw, list) or not all(isinstance(t, str) for t in raw):
                return self._bad_message("invalid_subscribe", "types must be a list of strings")
            try:
                types = parse_types(",".join(raw), self.app.stream_types()) if raw else None
            except ApiError as exc:
                return self._bad_message(exc.code, exc.message)
            self.client.types = types
            self._reply(Message("subscribed", {"types": sorted(types) if types else None}))
        elif kind == "ping":
            self._reply(Message("pong", {}))

    def _bad_message(self, code: str, text: str) -> None:
        self._bad += 1
        if self._bad > MAX_BAD_MESSAGES:
            self.close(CLOSE_POLICY, "too many invalid messages")
            return
        self._reply(error_message(code, text))

    @property
    def _closing(self) -> bool:
        return self.ws_connection is None or self.ws_connection.is_closing()

    def _reply(self, message: Message) -> None:
        if self._closing:
            return
        future = self.write_message(message.text)
        # A peer that disconnects before the reply is flushed is not an error.
        future.add_done_callback(lambda f: f.cancelled() or f.exception())

    def on_close(self) -> None:
        if self.client is not None:
            self.app.hub.detach(self.client)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps({"error": {"code": "error", "message": self._reason}}))
