"""The wire envelope, encoded once per message for every client and transport.

``{"type": str, "seq": int (durable events only), "timestamp": RFC 3339 UTC, "data": {...}}``
"""

from __future__ import annotations

import json
import struct
from datetime import datetime
from typing import Any

from ..windows import isoformat, utc_now

# The event-type vocabulary, defined here only.
# Durable events are persisted in the event log and carry its id as ``seq``.
DURABLE_TYPES = frozenset({"violation", "alert", "quota_change", "throttle"})
# What the core streams: the durable events and the stats snapshot.
CORE_TYPES = DURABLE_TYPES | {"stats"}
# Delivered whatever a client's filter says.
CONTROL_TYPES = frozenset({"welcome", "ping", "recovered", "error"})
# What a WebSocket client may send.
CLIENT_TYPES = frozenset({"subscribe", "pong", "ping"})
# Everything the server sends of its own: with the replies (``subscribed``, SSE's final
# ``close``). The dashboard's EventSource listens to these (and the plugins' types).
SERVER_TYPES = CORE_TYPES | CONTROL_TYPES | {"subscribed", "close"}
# No plugin may declare these.
RESERVED_TYPES = SERVER_TYPES | CLIENT_TYPES

# Close codes (also documented in docs/protocol.md).
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_SERVER_ERROR = 1011
CLOSE_RESTART = 1012
CLOSE_TRY_AGAIN = 1013
CLOSE_SLOW_CONSUMER = 4008

# Precedes a ping on SSE: a comment line keeps idle proxies from timing the stream out even
# where the ``ping`` event itself is ignored.
SSE_HEARTBEAT = b": heartbeat\n\n"


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


class Message:
    """An immutable envelope; its text and every wire form are built once and shared."""

    __slots__ = (
        "type",
        "seq",
        "timestamp",
        "data",
        "text",
        "_sse",
        "_sse_event",
        "_chunk",
        "_frame",
    )

    def __init__(
        self,
        type: str,
        data: dict[str, Any],
        seq: int | None = None,
        timestamp: datetime | str | None = None,
    ):
        self.type = type
        self.seq = seq
        if timestamp is None:
            timestamp = utc_now()
        self.timestamp = timestamp if isinstance(timestamp, str) else isoformat(timestamp)
        self.data = data
        envelope: dict[str, Any] = {"type": type}
        if seq is not None:
            envelope["seq"] = seq
        envelope["timestamp"] = self.timestamp
        envelope["data"] = data
        self.text = _dumps(envelope)
        self._sse: bytes | None = None
        self._sse_event: bytes | None = None
        self._chunk: bytes | None = None
        self._frame: bytes | None = None

    @property
    def sse(self) -> bytes:
        """The Server-Sent Events frame: ``id`` (durable only), ``event``, ``data``."""
        if self._sse is None:
            head = f"id: {self.seq}\n" if self.seq is not None else ""
            self._sse = f"{head}event: {self.type}\ndata: {self.text}\n\n".encode()
        return self._sse

    @property
    def sse_event(self) -> bytes:
        """What an SSE stream carries for this message (a ping after a comment line)."""
        if self._sse_event is None:
            self._sse_event = SSE_HEARTBEAT + self.sse if self.type == "ping" else self.sse
        return self._sse_event

    @property
    def sse_chunk(self) -> bytes:
        """:attr:`sse_event` as one HTTP/1.1 chunk, framed as Tornado frames a ``flush``."""
        if self._chunk is None:
            event = self.sse_event
            self._chunk = b"%x\r\n%s\r\n" % (len(event), event)
        return self._chunk

    @property
    def ws_frame(self) -> bytes:
        """The complete server-to-client WebSocket text frame (RFC 6455: FIN, unmasked)."""
        if self._frame is None:
            payload = self.text.encode()
            n = len(payload)
            if n < 126:
                head = struct.pack("!BB", 0x81, n)
            elif n <= 0xFFFF:
                head = struct.pack("!BBH", 0x81, 126, n)
            else:
                head = struct.pack("!BBQ", 0x81, 127, n)
            self._frame = head + payload
        return self._frame

    def __repr__(self) -> str:
        return f"Message({self.type!r}, seq={self.seq})"


def error_message(code: str, message: str) -> Message:
    return Message("error", {"code": code, "message": message})
