"""Server-Sent Events transport: ``GET /sse/admin/quotas``.

``id:`` is the event seq (durable events only), ``event:`` the type, ``data:`` the JSON
envelope. Resume with the ``Last-Event-ID`` header (EventSource sends it) or
``?last_event_id=N``. Heartbeats are comment lines plus a ``ping`` event.

Admission is the WebSocket handshake's (:func:`quotaserver.handlers.admission.admit`), all
before the first byte of the stream; a refusal is raised and rendered by ``write_error``.
When the server ends a stream (logout, revoked token,
shutdown) its last event is ``close`` with the WebSocket close code it stands for, e.g.
``{"code": 1008, "reason": "credentials revoked"}``: EventSource would otherwise just
reconnect (and get a 401).
"""

from __future__ import annotations

import asyncio
from typing import Any

from tornado.iostream import StreamClosedError

from ..realtime.hub import Client
from ..realtime.messages import CLOSE_POLICY, CLOSE_SLOW_CONSUMER, Message
from .admission import Refusal, admit
from .base import VIEWER, BaseHandler
from .rawwrite import RawStream, raw_stream, send
from .streams import ascii_cursor


class SseClient(Client):
    transport = "sse"

    def __init__(self, handler: AdminEventsHandler, identity: Any, types: Any):
        super().__init__(identity.key if identity else "anonymous", types)
        self.handler = handler
        self.session_id = identity.session_id if identity else None
        self.token_id = identity.token_id if identity else None
        # Decided at the first write (the headers are flushed before the hub writes).
        self._raw: RawStream | None | bool = False

    def write(self, message: Message) -> asyncio.Future | None:
        raw = self._raw
        if raw is False:
            raw = self._raw = raw_stream(self.handler)
        if raw is None:  # the public path: the same bytes, copied and framed per client
            self.handler.write(message.sse_event)
            return self.handler.flush()
        # The bytes (chunk framing included) were built once for every client.
        return send(raw.stream, message.sse_chunk if raw.chunked else message.sse_event)

    def close(self, code: int, reason: str) -> None:
        if code == CLOSE_SLOW_CONSUMER:
            self.handler.end_stream(abort=True)
            return
        self.handler.end_stream(final=Message("close", {"code": code, "reason": reason}))


class AdminEventsHandler(BaseHandler):
    """The live admin stream over Server-Sent Events."""

    roles = VIEWER

    def prepare(self) -> None:
        result = admit(self.app, self, self.roles)
        if isinstance(result, Refusal):
            raise result
        self.identity, self._types = result.identity, result.types

    async def get(self) -> None:
        # Nothing awaits between prepare() and register(): the admission still holds.
        types = self._types
        cursor = ascii_cursor(
            self.request.headers.get("Last-Event-ID")
            or self.get_query_argument("last_event_id", None)
        )
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        self.write(f"retry: {self.app.config['realtime.sse_retry_ms']}\n\n".encode())
        self._ended = asyncio.Event()
        self.client = SseClient(self, self.identity, types)
        self.app.hub.register(self.client)
        try:
            await self.flush()
            if not self.app.auth.still_valid(self.identity):
                # Revoked or logged out while the first bytes were flushed.
                revoked = {"code": CLOSE_POLICY, "reason": "credentials revoked"}
                self.end_stream(final=Message("close", revoked))
                return
            await self.app.hub.attach(self.client, cursor)
            await self._ended.wait()
        except StreamClosedError:
            pass
        finally:
            self.app.hub.detach(self.client)

    def end_stream(self, abort: bool = False, final: Message | None = None) -> None:
        """Finish the response (or drop the connection of a client that stopped reading)."""
        if abort and self.request.connection is not None:
            self.request.connection.close()
        elif final is not None and not self._ended.is_set():
            self.write(final.sse)  # buffered; sent when get() finishes the response
        self._ended.set()

    def on_connection_close(self) -> None:
        if hasattr(self, "client"):
            self.app.hub.detach(self.client)
        if hasattr(self, "_ended"):
            self._ended.set()
