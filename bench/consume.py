"""Consume benchmark: concurrent services calling POST /api/quotas/consume.

Reports throughput, latency percentiles, how many were denied, and how late the
heartbeat arrived while the server was under that load (the IOLoop must not stall).

    python bench/consume.py --concurrency 32 --seconds 10
    python bench/consume.py --keyed      # every consume with its own Idempotency-Key
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

from common import HttpClient, LeanWebSocket, machine, percentile, start_server

COMMANDS = ["shell", "code", "test", "review", "refactor"]


def decision(rng: random.Random) -> dict:
    return {"user": f"user{rng.randrange(200)}", "command_type": rng.choice(COMMANDS)}


async def worker(
    port: int,
    stop_at: float,
    latencies: list,
    codes: dict,
    seed: int,
    keyed: bool,
    batch: int = 0,
) -> None:
    rng = random.Random(seed)
    http = HttpClient(port)
    await http.open()
    path = "/api/quotas/consume/batch" if batch else "/api/quotas/consume"
    while time.perf_counter() < stop_at:
        if batch:
            body = json.dumps({"decisions": [decision(rng) for _ in range(batch)]}).encode()
        else:
            body = json.dumps(decision(rng)).encode()
        extra = f"Idempotency-Key: {seed}-{len(latencies)}-{rng.random()}\r\n" if keyed else ""
        t0 = time.perf_counter()
        status, _ = await http.post(path, body, extra)
        latencies.append(time.perf_counter() - t0)
        codes[status] = codes.get(status, 0) + 1
    http.close()


async def heartbeat_gaps(port: int, interval: float, stop_at: float) -> list[float]:
    """Gaps between consecutive ping messages, as one live dashboard sees them."""
    ws = LeanWebSocket()
    await ws.connect(port, "types=ping")  # control messages only
    reader_task = ws.task
    ws.task.cancel()
    gaps, last = [], None
    try:
        while time.perf_counter() < stop_at:
            b0, b1 = await asyncio.wait_for(ws.reader.readexactly(2), interval * 5)
            length = b1 & 0x7F
            if length == 126:
                length = int.from_bytes(await ws.reader.readexactly(2), "big")
            payload = await ws.reader.readexactly(length)
            if b'"type":"ping"' in payload[:20]:
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
    except TimeoutError:
        gaps.append(float("inf"))
    del reader_task
    ws.writer.close()
    return gaps


async def run(
    concurrency: int, seconds: float, synchronous: str, keyed: bool = False, batch: int = 0
) -> dict:
    interval = 1.0
    server = start_server(
        realtime_heartbeat_interval=interval,
        database_sqlite_synchronous=synchronous,
    )
    try:
        latencies: list[float] = []
        codes: dict[int, int] = {}
        stop_at = time.perf_counter() + seconds
        cpu_before = sum(server.ps.cpu_times()[:2])
        started = time.perf_counter()
        results = await asyncio.gather(
            heartbeat_gaps(server.port, interval, stop_at),
            *(
                worker(server.port, stop_at, latencies, codes, i, keyed, batch)
                for i in range(concurrency)
            ),
        )
        elapsed = time.perf_counter() - started
        cpu_used = sum(server.ps.cpu_times()[:2]) - cpu_before
        gaps = results[0]
        return {
            "concurrency": concurrency,
            "seconds": round(elapsed, 1),
            "sqlite_synchronous": synchronous,
            "idempotency_keys": keyed,
            "requests": len(latencies),
            "requests_per_s": round(len(latencies) / elapsed, 1),
            "batch": batch or None,
            "decisions_per_s": round(len(latencies) * max(batch, 1) / elapsed, 1),
            "status_counts": codes,
            "latency_ms_p50": round(percentile(latencies, 0.50) * 1000, 2),
            "latency_ms_p99": round(percentile(latencies, 0.99) * 1000, 2),
            "server_cpu_ms_per_request": round(cpu_used / max(len(latencies), 1) * 1000, 3),
            "heartbeat_interval_s": interval,
            "heartbeat_gap_s_max": round(max(gaps), 3) if gaps else None,
            "server_rss_mib": round(server.ps.memory_info().rss / 2**20, 1),
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--synchronous", default="full", choices=["full", "normal"])
    parser.add_argument("--keyed", action="store_true", help="an Idempotency-Key per consume")
    parser.add_argument("--batch", type=int, default=0, help="decisions per batch request")
    args = parser.parse_args()
    print(f"# machine: {machine()}")
    result = asyncio.run(
        run(args.concurrency, args.seconds, args.synchronous, args.keyed, args.batch)
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
