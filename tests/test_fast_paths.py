"""The fan-out fast paths put on the wire exactly what Tornado's public API would.

quotaserver writes each message's prebuilt bytes straight to every client's socket
(``quotaserver/handlers/rawwrite.py``). Reference servers in this file send the same
messages through Tornado's own ``write_message`` and through the SSE handler's former
``write`` + ``flush`` path; raw socket clients compare the bytes.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket

import pytest
import tornado.httpserver
import tornado.web
import tornado.websocket
from clients import ADMIN

from quotaserver.handlers.rawwrite import RawStream
from quotaserver.realtime.messages import Message

QUIET = {
    "plugins": {"alert_engine": {"enabled": False}},
    "realtime__stats_interval": 3600,
    "realtime__heartbeat_interval": 3600,
}


def messages(first_seq: int) -> list[Message]:
    """Every frame length class (7-bit, 16-bit, 64-bit), non-ASCII text, a ping."""
    stamp = "2026-03-10T12:00:00.000000Z"
    return [
        Message("quota_change", {"n": 1}, seq=first_seq, timestamp=stamp),
        Message("quota_change", {"note": "é→✓ " * 40}, seq=first_seq + 1, timestamp=stamp),
        Message("ping", {"server_time": stamp}, timestamp=stamp),
        Message("alert", {"blob": "x" * 70_000}, seq=first_seq + 2, timestamp=stamp),
        Message("stats", {"delta": True, "commands_today": 3}, timestamp=stamp),
    ]


class ReferenceSocket(tornado.websocket.WebSocketHandler):
    def initialize(self, outgoing: list[Message]) -> None:
        self.outgoing = outgoing

    async def open(self) -> None:
        for message in self.outgoing:
            await self.write_message(message.text)


class ReferenceEvents(tornado.web.RequestHandler):
    """The SSE handler's write path before the fast path: write + flush per message."""

    def initialize(self, outgoing: list[Message]) -> None:
        self.outgoing = outgoing

    async def get(self) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.write(b"retry: 2000\n\n")
        await self.flush()
        for message in self.outgoing:
            if message.type == "ping":
                self.write(b": heartbeat\n\n")
            self.write(message.sse)
            await self.flush()


async def reference_server(outgoing: list[Message]) -> tuple[tornado.httpserver.HTTPServer, int]:
    app = tornado.web.Application(
        [
            ("/ws", ReferenceSocket, {"outgoing": outgoing}),
            ("/sse", ReferenceEvents, {"outgoing": outgoing}),
        ]
    )
    server = tornado.httpserver.HTTPServer(app)
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server.add_sockets(sockets)
    return server, sockets[0].getsockname()[1]


class RawClient:
    """A socket that sends one request and collects every byte of the response."""

    async def open(self, port: int, path: str, websocket: bool) -> bytes:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        extra = (
            "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
            f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}\r\n"
            if websocket
            else "Accept: text/event-stream\r\n"
        )
        self.writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}"
            f"Authorization: Bearer {ADMIN}\r\n\r\n".encode()
        )
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5)
        self.body = b""
        return head

    async def until(self, condition, what: str) -> bytes:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while not condition(self.body):
            left = max(deadline - loop.time(), 0.001)
            try:
                chunk = await asyncio.wait_for(self.reader.read(1 << 16), left)
            except TimeoutError:
                raise AssertionError(f"no {what}: {self.body[-300:]!r}") from None
            if not chunk:
                raise AssertionError(f"closed before {what}: {self.body[-300:]!r}")
            self.body += chunk
        return self.body

    def close(self) -> None:
        self.writer.close()


def fast_path_taken(app, transport: str) -> bool:
    """The bytes compared above came from the direct path, not the public fallback."""
    clients = [c for c in app.hub.clients if c.transport == transport]
    return len(clients) == 1 and isinstance(clients[0]._raw, RawStream)


def ws_frames(data: bytes) -> list[bytes]:
    """Split server frames (unmasked) into their complete raw bytes."""
    frames, pos = [], 0
    while pos < len(data):
        length, start = data[pos + 1] & 0x7F, pos + 2
        if length == 126:
            length, start = int.from_bytes(data[pos + 2 : pos + 4], "big"), pos + 4
        elif length == 127:
            length, start = int.from_bytes(data[pos + 2 : pos + 10], "big"), pos + 10
        frames.append(data[pos : start + length])
        pos = start + length
    return frames


@pytest.mark.gen_test(timeout=30)
async def test_websocket_frames_are_byte_identical_to_tornados_write_message(app_factory):
    app = await app_factory(**QUIET)
    outgoing = messages(app.hub.last_seq + 1)
    server, port = await reference_server(outgoing)
    expected = RawClient()
    head = await expected.open(port, "/ws", websocket=True)
    assert b" 101 " in head
    total = sum(len(m.ws_frame) for m in outgoing)
    reference = await expected.until(lambda b: len(b) >= total, "reference frames")
    expected.close()
    server.stop()

    client = RawClient()
    assert b" 101 " in await client.open(app.port, "/ws/admin/quotas", websocket=True)
    await client.until(lambda b: b'"type":"stats"' in b, "the welcome and the snapshot")
    start = len(client.body)
    for message in outgoing:
        app.hub.publish(message)
    await client.until(lambda b: len(b) - start >= total, "the published frames")

    assert ws_frames(client.body[start:]) == ws_frames(reference)
    assert client.body[start:] == reference
    assert [m.ws_frame for m in outgoing] == ws_frames(reference)
    assert fast_path_taken(app, "websocket")
    client.close()


@pytest.mark.gen_test(timeout=30)
async def test_sse_bytes_are_identical_to_the_handlers_write_and_flush(app_factory):
    app = await app_factory(**QUIET)
    outgoing = messages(app.hub.last_seq + 1)
    server, port = await reference_server(outgoing)
    expected = RawClient()
    head = await expected.open(port, "/sse", websocket=False)
    assert b"Transfer-Encoding: chunked" in head
    last = outgoing[-1].sse
    reference = await expected.until(lambda b: last + b"\r\n" in b, "reference events")
    # From the first event to the end of the last one (the reference then ends its response).
    begin = reference.index(b"retry: 2000\n\n\r\n") + len(b"retry: 2000\n\n\r\n")
    reference = reference[begin : reference.index(last + b"\r\n") + len(last) + 2]
    expected.close()
    server.stop()

    client = RawClient()
    head = await client.open(app.port, "/sse/admin/quotas", websocket=False)
    assert b" 200 " in head and b"Transfer-Encoding: chunked" in head
    await client.until(lambda b: b"event: stats\n" in b and b.endswith(b"\r\n"), "the snapshot")
    start = len(client.body)
    for message in outgoing:
        app.hub.publish(message)
    await client.until(lambda b: b.endswith(outgoing[-1].sse + b"\r\n"), "the published events")

    assert client.body[start:] == reference
    assert reference == b"".join(m.sse_chunk for m in outgoing)
    assert fast_path_taken(app, "sse")
    client.close()


@pytest.mark.gen_test(timeout=60)
async def test_an_sse_client_that_stops_reading_is_cut_off_and_delays_no_one(app_factory):
    """The slow-consumer rules hold on the direct path: pending writes are still counted."""
    app = await app_factory(**QUIET, realtime__client_queue=20, realtime__client_queue_bytes=65536)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", app.port))
    stuck = RawClient()
    stuck.reader, stuck.writer = await asyncio.open_connection(sock=sock)
    request = f"GET /sse/admin/quotas HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n"
    stuck.writer.write(request.encode() + b"\r\n")
    stuck.body = b""
    await stuck.until(lambda b: b"event: welcome" in b, "the welcome")
    stuck.writer.transport.pause_reading()  # stop reading: the server's writes back up
    healthy = RawClient()
    await healthy.open(app.port, "/sse/admin/quotas", websocket=False)
    await healthy.until(lambda b: b"event: stats\n" in b, "the snapshot")
    assert app.hub.count("sse") == 2
    note = "x" * 8000
    peak = 0
    for i in range(1500):  # ~12 MB: more than loopback socket buffers hold
        message = Message("quota_change", {"note": note, "i": i}, seq=app.hub.last_seq + 1)
        app.hub.publish(message)
        await healthy.until(lambda b, m=message: b.endswith(m.sse_chunk), f"event {i}")
        healthy.body = b""
        for client in app.hub.clients:
            peak = max(peak, client.pending_bytes)
    assert app.hub.slow_closed == 1
    assert app.hub.count("sse") == 1  # only the healthy one is left
    assert 0 < peak <= 65536 + 8200  # writes did queue, bounded by the byte cap (+ one)
    stuck.close()
    healthy.close()
