"""Baseline: the straightforward Tornado broadcaster, and a bare JSON POST handler.

What a user would write first: one WebSocket/SSE handler per client kept in a set, and on
every event ``write_message(dict)`` (Tornado encodes and frames it for each client) or, for
SSE, ``write`` + ``flush`` of a string formatted for each client. No database: the trigger
answers once every write has been queued.

``POST /consume`` is the framework's ceiling for the consume benchmark: it parses the JSON
body and answers JSON, nothing else.

    python bench/baseline_tornado.py --port 8900
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
from datetime import UTC, datetime

import tornado.httpserver
import tornado.web
import tornado.websocket

SEQ = itertools.count(1)


def envelope(body: dict) -> dict:
    """The same wire envelope as quotaserver's: type, seq, timestamp, data."""
    return {
        "type": body.get("type", "quota_change"),
        "seq": next(SEQ),
        "timestamp": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
        "data": body.get("data", {}),
    }


class Sockets(tornado.websocket.WebSocketHandler):
    clients: set[Sockets] = set()

    def check_origin(self, origin: str) -> bool:
        return True

    def open(self) -> None:
        self.clients.add(self)

    def on_close(self) -> None:
        self.clients.discard(self)


class Events(tornado.web.RequestHandler):
    clients: set[Events] = set()

    async def get(self) -> None:
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.write("retry: 2000\n\n")
        self._done = asyncio.Event()
        self.clients.add(self)
        try:
            await self.flush()
            await self._done.wait()
        finally:
            self.clients.discard(self)

    def on_connection_close(self) -> None:
        self.clients.discard(self)
        if hasattr(self, "_done"):
            self._done.set()


class Trigger(tornado.web.RequestHandler):
    def post(self) -> None:
        event = envelope(json.loads(self.request.body))
        for client in list(Sockets.clients):
            try:
                client.write_message(event)
            except tornado.websocket.WebSocketClosedError:
                Sockets.clients.discard(client)
        for client in list(Events.clients):
            client.write(
                f"id: {event['seq']}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"
            )
            client.flush()
        self.write({"seq": event["seq"], "type": event["type"]})


class Consume(tornado.web.RequestHandler):
    def post(self) -> None:
        body = json.loads(self.request.body)
        self.write({"allowed": True, "user": body.get("user"), "remaining": 100})


def make_app() -> tornado.web.Application:
    return tornado.web.Application(
        [("/ws", Sockets), ("/sse", Events), ("/trigger", Trigger), ("/consume", Consume)]
    )


async def serve(port: int) -> None:
    server = tornado.httpserver.HTTPServer(make_app())
    server.listen(port, "127.0.0.1", backlog=4096)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(f"listening on {port}", flush=True)
    await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
