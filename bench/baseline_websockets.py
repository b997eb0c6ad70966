"""Baseline: the ``websockets`` library's ``broadcast()`` (encode once, write to every socket).

WebSocket clients connect to ``--port``; the trigger is the same HTTP ``POST /trigger`` as
the other servers, served by a minimal HTTP/1.1 listener on ``--port + 1`` in the same
event loop (websockets serves only the upgrade). No database, no pings, no compression.

    python bench/baseline_websockets.py --port 8900
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

from baseline_tornado import envelope
from websockets.asyncio.server import ServerConnection, broadcast, serve

CLIENTS: set[ServerConnection] = set()


async def handler(ws: ServerConnection) -> None:
    CLIENTS.add(ws)
    try:
        await ws.wait_closed()
    finally:
        CLIENTS.discard(ws)


async def trigger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep-alive ``POST /trigger``: broadcast the envelope, answer its seq."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            event = envelope(json.loads(await reader.readexactly(length)))
            broadcast(CLIENTS, json.dumps(event))
            body = json.dumps({"seq": event["seq"], "type": event["type"]}).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def main_async(port: int) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    http = await asyncio.start_server(trigger, "127.0.0.1", port + 1)
    async with serve(
        handler, "127.0.0.1", port, ping_interval=None, compression=None, backlog=4096
    ):
        print(f"listening on {port}", flush=True)
        await stop.wait()
    http.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main_async(parser.parse_args().port))


if __name__ == "__main__":
    main()
