"""Notify benchmark: does a notification target slow consumes? (issue 24)

Every consume is a violation (daily limit 0) and the target takes violations, so each
consume gives the notify plugin a delivery. Three servers, the same load each: no target, a
target that answers at once, and a target that accepts connections and never answers (the
worst kind of down: every delivery waits for its timeout). Reports consume throughput and
latency percentiles for each, and what the target had queued at the end.

    python bench/notify.py --concurrency 8 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import time

import yaml
from common import TOKEN, HttpClient, machine, percentile, start_server

SECRET = "bench-webhook-secret-0123456789"


async def receiver(hang: bool) -> tuple[asyncio.Server, int, asyncio.Event]:
    """A webhook receiver on 127.0.0.1: 200 at once, or (``hang``) no answer until the
    returned event is set (the end of the run)."""
    done = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                if hang:
                    await done.wait()
                    break
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, family=socket.AF_INET)
    return server, server.sockets[0].getsockname()[1], done


async def worker(port: int, user: str, stop_at: float, latencies: list[float]) -> None:
    http = HttpClient(port)
    await http.open()
    body = json.dumps({"user": user, "command_type": "shell"}).encode()
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        status, _ = await http.post("/api/quotas/consume", body)
        latencies.append(time.perf_counter() - t0)
        assert status == 429, status  # a violation: a delivery for the target
    http.close()


async def queued(port: int) -> int | None:
    http = HttpClient(port)
    await http.open()
    http.writer.write(
        f"GET /api/ws/health HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
    )
    head = await http.reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    health = json.loads(await http.reader.readexactly(length))
    http.close()
    targets = health.get("plugins_health", {}).get("notify", {}).get("targets", {})
    return targets["hook"]["queued"] if targets else None


async def run(case: str, concurrency: int, seconds: float) -> dict:
    settings = {"quotas_defaults": "{shell: {daily: 0}}", "throttle_source": "off"}
    rx = None
    if case != "no target":
        rx, port, done = await receiver(hang=case == "target hangs")
        target = {
            "name": "hook",
            "kind": "webhook",
            "url": f"http://127.0.0.1:{port}/hook",
            "secret": SECRET,
            "events": ["violation"],
            "timeout": 30,
        }
        settings["plugins_notify_targets"] = yaml.safe_dump([target], default_flow_style=True)
    server = start_server(**settings)
    try:
        latencies: list[float] = []
        stop_at = time.perf_counter() + seconds
        started = time.perf_counter()
        await asyncio.gather(
            *(worker(server.port, f"u{i}", stop_at, latencies) for i in range(concurrency))
        )
        elapsed = time.perf_counter() - started
        return {
            "case": case,
            "concurrency": concurrency,
            "requests": len(latencies),
            "requests_per_s": round(len(latencies) / elapsed, 1),
            "latency_ms_p50": round(percentile(latencies, 0.50) * 1000, 2),
            "latency_ms_p99": round(percentile(latencies, 0.99) * 1000, 2),
            "target_queued_at_end": await queued(server.port),
        }
    finally:
        server.stop()
        if rx is not None:
            done.set()
            rx.close()
            await rx.wait_closed()


async def main_async(concurrency: int, seconds: float, rounds: int) -> list[dict]:
    rows = []
    for _ in range(rounds):  # interleaved: drift on a shared machine hits every case alike
        for case in ("no target", "target answers", "target hangs"):
            rows.append(await run(case, concurrency, seconds))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    print(f"# machine: {machine()}")
    for row in asyncio.run(main_async(args.concurrency, args.seconds, args.rounds)):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
