"""Several instances on PostgreSQL + Redis: violation latency across instances, and
consume throughput with 1 and with 2 worker processes.

    python bench/cluster.py                 # 300 violations, 10 s of wrk per row
    python bench/cluster.py --quick         # a smoke-sized run

Starts its own PostgreSQL cluster and redis-server on loopback (Debian packages
postgresql and redis-server) and drives real ``run.py`` processes. Throughput needs ``wrk``
(Debian package wrk). Prints JSON lines after a "# machine:" line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from common import machine, percentile  # noqa: E402
from services import Postgres, Redis, start_server  # noqa: E402
from tornado.httpclient import AsyncHTTPClient, HTTPRequest  # noqa: E402
from tornado.websocket import websocket_connect  # noqa: E402

TOKEN = "bench-admin-token-0123456789abcdef"
SHA = __import__("hashlib").sha256(TOKEN.encode()).hexdigest()
WRK_SCRIPT = """
math.randomseed(os.time())
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
request = function()
  local body = '{"user":"u' .. math.random(1, 2000) .. '","command_type":"shell"}'
  return wrk.format(nil, "/api/quotas/consume", nil, body)
end
"""


def config(db_url: str, redis_url: str, workdir: str, limit: int) -> dict:
    return {
        "database": {"url": db_url, "pool_size": 8},
        "backplane": {"url": redis_url, "secret": "bench-backplane-secret-0123456789abcdef"},
        "auth": {
            "tokens": [{"name": "bench", "role": "admin", "sha256": SHA}],
            "token_file": os.path.join(workdir, "admin_token"),
        },
        "server": {"log_level": "warning"},
        "throttle": {"cpu_bands": [[100, 1.0]], "memory_bands": [[100, 1.0]]},
        "quotas": {"defaults": {"shell": {"daily": limit, "weekly": None, "monthly": None}}},
        "plugins": {"system_metrics": {"enabled": False}},
    }


async def post_consume(url: str, user: str) -> int:
    request = HTTPRequest(
        url + "/api/quotas/consume",
        method="POST",
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        body=json.dumps({"user": user, "command_type": "shell"}),
    )
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    return response.code


async def violation_latency(a_url: str, b_url: str, count: int, rate: float) -> dict:
    """Seconds from sending a refused consume to A until B's WebSocket client has it."""
    results = {}
    for name, target in (("same_instance", a_url), ("across_instances", b_url)):
        ws = await websocket_connect(
            HTTPRequest(
                target.replace("http", "ws") + "/ws/admin/quotas?types=violation",
                headers={"Authorization": f"Bearer {TOKEN}"},
            )
        )
        while json.loads(await ws.read_message())["type"] != "welcome":
            pass
        latencies = []
        for _ in range(count):
            started = time.perf_counter()
            assert await post_consume(a_url, "mallory") == 429
            while json.loads(await ws.read_message())["type"] != "violation":
                pass
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(1 / rate)
        ws.close()
        results[name] = {
            "violations": count,
            "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
            "max_ms": round(max(latencies) * 1000, 2),
        }
    return results


def wrk(url: str, seconds: int, connections: int, workdir: str) -> dict:
    script = os.path.join(workdir, "consume.lua")
    with open(script, "w", encoding="utf-8") as fh:
        fh.write(WRK_SCRIPT % TOKEN)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        value, unit = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out).groups()
        return round(float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit], 2)

    return {
        "requests_per_s": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": ms("50%"),
        "p99_ms": ms("99%"),
        "non_2xx": int(m.group(1)) if (m := re.search(r"Non-2xx.*?(\d+)", out)) else 0,
    }


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke-sized run")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    count, seconds = (20, 2) if args.quick else (300, 10)
    print(f"# machine: {machine()}", flush=True)
    pg, redis = Postgres(), Redis()
    pg.start()
    redis.start()
    workdir = tempfile.mkdtemp(prefix="qs-bench-cluster-")
    servers = []
    try:
        cfg = config(pg.create_database(), redis.url, workdir, limit=0)
        a = await start_server(workdir, cfg)
        b = await start_server(workdir, cfg)
        servers += [a, b]
        latency = await violation_latency(a.url, b.url, count, rate=50)
        for name, figures in latency.items():
            print(json.dumps({"bench": "violation_latency", "path": name, **figures}), flush=True)
        for server in servers:
            await server.stop()
        servers.clear()
        if shutil.which("wrk") is None:
            print("# throughput skipped: wrk not installed (apt-get install wrk)", flush=True)
            return 0
        for workers in (1, 2):
            cfg = config(pg.create_database(), redis.url, workdir, limit=10**9)
            server = await start_server(workdir, cfg, "--workers", str(workers))
            servers.append(server)
            await post_consume(server.url, "warmup")
            result = await asyncio.get_running_loop().run_in_executor(
                None, wrk, server.url, seconds, args.connections, workdir
            )
            print(
                json.dumps(
                    {"bench": "consume", "database": "postgresql", "workers": workers,
                     "connections": args.connections, "seconds": seconds, **result}
                ),
                flush=True,
            )  # fmt: skip
            await server.stop()
            servers.remove(server)
    finally:
        for server in servers:
            server.kill()
        redis.kill()
        pg.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
