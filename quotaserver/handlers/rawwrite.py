"""Shared bytes straight to a client's socket: the fan-out fast path of both transports.

A broadcast encodes each message once (:class:`~quotaserver.realtime.messages.Message`);
Tornado's public write paths would re-frame it per client (``write_message``) or copy it
through the handler's buffer and the HTTP connection's chunk framing (``write`` +
``flush``), each with a Future. :func:`raw_stream` is the only place that looks at Tornado
internals to decide whether the prebuilt bytes may go to the IOStream directly; when it
answers None the transports use the public API, with the same bytes on the wire.
"""

from __future__ import annotations

from asyncio import Future
from dataclasses import dataclass
from typing import Any

from tornado.iostream import IOStream, StreamClosedError
from tornado.web import RequestHandler
from tornado.websocket import WebSocketHandler


@dataclass(frozen=True, slots=True)
class RawStream:
    stream: IOStream
    chunked: bool  # an HTTP/1.1 streaming response: each write is one chunk


def raw_stream(handler: RequestHandler) -> RawStream | None:
    """The plain-TCP IOStream under ``handler`` if prebuilt bytes may be written to it.

    WebSocket: an open connection without permessage-deflate (frames are then exactly
    :attr:`Message.ws_frame`). Server-Sent Events: headers already sent, nothing buffered
    in the handler, no output transform and no Content-Length (chunked or HTTP/1.0 raw).
    TLS streams and anything unexpected (another Tornado version) answer None.
    """
    try:
        if isinstance(handler, WebSocketHandler):
            conn: Any = handler.ws_connection
            if conn is None or conn.is_closing() or conn._compressor is not None:
                return None
            stream, chunked = conn.stream, False
        else:
            http: Any = handler.request.connection
            if (
                not handler._headers_written
                or handler._write_buffer
                or handler._transforms
                or handler.request.method == "HEAD"
                or http._expected_content_remaining is not None
            ):
                return None
            stream, chunked = http.stream, bool(http._chunking_output)
    except AttributeError:
        return None
    if type(stream) is not IOStream:  # SSLIOStream: its socket must not be written raw
        return None
    return RawStream(stream, chunked)


def send(stream: IOStream, data: bytes) -> Future | None:
    """Write ``data`` in order with anything queued; None if the kernel took all of it.

    When nothing is queued the bytes go to the kernel at once (no copy, no Future); the
    rest, or everything behind a queue, goes through :meth:`IOStream.write`, whose Future
    the hub counts as a pending write (the slow-consumer rules).
    """
    if stream.closed():
        raise StreamClosedError()
    if not stream.writing():
        try:
            sent = stream.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            raise StreamClosedError(real_error=exc) from None
        if sent == len(data):
            return None
        data = data[sent:]
    return stream.write(data)
