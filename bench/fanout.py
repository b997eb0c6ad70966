"""Fan-out benchmark: N WebSocket clients, M durable events; end-to-end latency and cost.

Each event is created through the real path (HTTP -> SQLite commit -> hub -> every client)
by the dev endpoint ``/api/ws/test-broadcast``. Reported: delivery latency from the request
being sent to each client's receipt, the spread between the first and the last client of an
event, and the server's CPU time and memory.

    python bench/fanout.py --clients 1000 --events 200 --rate 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from common import HttpClient, LeanWebSocket, machine, percentile, start_server


async def run(clients: int, events: int, rate: float, payload: int) -> dict:
    server = start_server(
        dev="true",
        realtime_max_connections=clients + 10,
        realtime_stats_interval=3600,
        realtime_heartbeat_interval=3600,
        auth_connect_attempts_per_ip=clients * 2 + 10,
        auth_max_connections_per_identity=clients + 10,
        server_max_connections_per_ip=clients + 10,  # every client is on 127.0.0.1
    )
    try:
        conns = [LeanWebSocket() for _ in range(clients)]
        for i in range(0, clients, 50):
            await asyncio.gather(*(c.connect(server.port) for c in conns[i : i + 50]))
        await asyncio.sleep(1.0)
        rss_idle = server.ps.memory_info().rss
        http = HttpClient(server.port)
        await http.open()
        cpu_before = sum(server.ps.cpu_times()[:2])
        sent: dict[int, float] = {}
        note = "x" * payload
        started = time.perf_counter()
        for i in range(events):
            t0 = time.perf_counter()
            body = json.dumps({"type": "quota_change", "data": {"i": i, "note": note}}).encode()
            status, reply = await http.post("/api/ws/test-broadcast", body)
            assert status == 200, reply
            sent[json.loads(reply)["seq"]] = t0
            await asyncio.sleep(max(0.0, started + (i + 1) / rate - time.perf_counter()))
        deadline = time.perf_counter() + 30
        while time.perf_counter() < deadline:
            if all(len(c.arrivals) >= events for c in conns):
                break
            await asyncio.sleep(0.05)
        cpu_used = sum(server.ps.cpu_times()[:2]) - cpu_before
        rss_peak = server.ps.memory_info().rss
        latencies, spreads = [], []
        delivered = 0
        for seq, t0 in sent.items():
            times = [c.arrivals[seq] for c in conns if seq in c.arrivals]
            delivered += len(times)
            latencies.extend(t - t0 for t in times)
            if times:
                spreads.append(max(times) - min(times))
        http.close()
        for c in conns:
            c.close()
        return {
            "clients": clients,
            "events": events,
            "rate_per_s": rate,
            "payload_bytes": payload,
            "delivered": delivered,
            "expected": clients * events,
            "latency_ms_p50": round(percentile(latencies, 0.50) * 1000, 2),
            "latency_ms_p99": round(percentile(latencies, 0.99) * 1000, 2),
            "latency_ms_max": round(max(latencies) * 1000, 2) if latencies else None,
            "spread_ms_p50": round(percentile(spreads, 0.50) * 1000, 2),
            "spread_ms_p99": round(percentile(spreads, 0.99) * 1000, 2),
            "server_cpu_ms_per_event": round(cpu_used / events * 1000, 2),
            "server_cpu_us_per_delivery": round(cpu_used / max(delivered, 1) * 1e6, 2),
            "server_rss_mib_idle": round(rss_idle / 2**20, 1),
            "server_rss_mib_after": round(rss_peak / 2**20, 1),
        }
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="events per second")
    parser.add_argument("--payload", type=int, default=200, help="extra bytes per event")
    args = parser.parse_args()
    print(f"# machine: {machine()}")
    print(json.dumps(asyncio.run(run(args.clients, args.events, args.rate, args.payload))))


if __name__ == "__main__":
    main()
