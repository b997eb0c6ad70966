"""Side-by-side benchmark: quotaserver against what users would pick instead.

Broadcasters, each in its own process pinned to the server core:

- ``quotaserver``: the real ``run.py``; the trigger is ``POST /api/ws/test-broadcast``, so
  every figure includes the HTTP request and the SQLite commit of the durable event;
- ``tornado``: the straightforward Tornado broadcaster (``bench/baseline_tornado.py``);
- ``websockets``: ``websockets.broadcast()`` (``bench/baseline_websockets.py``, WebSocket only).

The load generator is this process, pinned to another core, on uvloop with
``asyncio.Protocol`` clients that parse only frame lengths and the event's seq, connected
from 127.0.0.2-201 so that no source-port range or per-address limit is hit. Each event is
sent once the previous one reached every client (closed loop), so latencies do not queue.

Consume: keep-alive HTTP clients call quotaserver's ``POST /api/quotas/consume`` under
``synchronous=full`` and the bare Tornado JSON handler, for a fixed time.

    python bench/sidebyside.py fanout --server quotaserver --transport ws --sizes 100,1000
    python bench/sidebyside.py consume --server tornado --connections 32 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import psutil
from common import ROOT, TOKEN, HttpClient, free_port, percentile

HERE = os.path.dirname(os.path.abspath(__file__))
SERVERS = ("quotaserver", "tornado", "websockets")
TRANSPORTS = {"quotaserver": ("ws", "sse"), "tornado": ("ws", "sse"), "websockets": ("ws",)}
# Events per size in a full run: 50 at every size, so that one event delayed by a moment
# of descheduling is 2 % of the deliveries, not the p99 (with 15 it was 7 %).
EVENTS = {100: 50, 1000: 50, 5000: 50, 10000: 50}
WS_EVENT = re.compile(rb'\{"type": ?"quota_change", ?"seq": ?(\d+)')
SSE_EVENT = re.compile(rb"id: (\d+)\nevent: quota_change\n")
COMMANDS = ("shell", "code", "test", "review", "refactor")


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pin(cpus: str) -> None:
    os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


# -- servers ---------------------------------------------------------------------------
@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    port: int
    workdir: tempfile.TemporaryDirectory
    workers: int = 1
    spy: subprocess.Popen | None = None
    redis: subprocess.Popen | None = None  # the backplane of --workers N, on the same cores

    @property
    def label(self) -> str:
        return self.name if self.workers == 1 else f"{self.name} x{self.workers}"

    def processes(self) -> list[psutil.Process]:
        root = psutil.Process(self.proc.pid)
        extra = [psutil.Process(self.redis.pid)] if self.redis is not None else []
        return [root, *root.children(recursive=True), *extra]

    def rss(self) -> int:
        return sum(p.memory_info().rss for p in self.processes())

    def cpu(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self.processes())

    def paths(self, transport: str) -> str:
        if self.name == "quotaserver":
            return "/ws/admin/quotas" if transport == "ws" else "/sse/admin/quotas"
        return "/ws" if transport == "ws" else "/sse"

    @property
    def trigger(self) -> tuple[int, str]:
        if self.name == "quotaserver":
            return self.port, "/api/ws/test-broadcast"
        if self.name == "websockets":
            return self.port + 1, "/trigger"
        return self.port, "/trigger"

    @property
    def consume_path(self) -> str:
        return "/api/quotas/consume" if self.name == "quotaserver" else "/consume"

    def stop(self) -> None:
        if self.spy is not None:  # py-spy writes its samples on SIGINT
            self.spy.send_signal(signal.SIGINT)
            self.spy.wait(60)
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.redis is not None:
            self.redis.terminate()
            self.redis.wait(20)
        self.workdir.cleanup()


PROFILE: str | None = None  # --profile: run the server under cProfile, stats to this file
GC_LOG: str | None = None  # --gc-log: every collection's generation and pause, JSON lines
POOL_SIZE = 8  # --pool-size: database.pool_size of the instance (PostgreSQL)
PYSPY: str | None = None  # --py-spy: sample the server (every thread), collapsed stacks here


def launch(name: str, cpus: str, workers: int = 1, **settings: Any) -> Server:
    """Start one broadcaster pinned to ``cpus`` with the fd limit raised to the hard limit.

    ``settings`` are quotaserver's QUOTASERVER_* variables; ``workers`` > 1 passes
    ``--workers`` to run.py (the scale-out mode).
    """
    workdir = tempfile.TemporaryDirectory(prefix=f"bench-{name}-")
    port = free_port()
    while name == "websockets" and not port_free(port + 1):
        port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTASERVER_")}
    redis = None
    if name == "quotaserver":
        cmd = [sys.executable, os.path.join(ROOT, "run.py"), "--port", str(port)]
        if workers > 1:
            # Several workers need a backplane: a throw-away redis-server on the server's
            # cores (its CPU is counted with the server's).
            redis, redis_port = start_redis(cpus)
            cmd += ["--workers", str(workers)]
            settings = {**settings, "backplane_url": f"redis://127.0.0.1:{redis_port}/0"}
        env.update({"QUOTASERVER_ADMIN_TOKEN": TOKEN, "QUOTASERVER_SERVER_LOG_LEVEL": "warning"})
        env.update({f"QUOTASERVER_{k.upper()}": str(v) for k, v in settings.items()})
    else:
        cmd = [sys.executable, os.path.join(HERE, f"baseline_{name}.py"), "--port", str(port)]
    if PROFILE:
        cmd[1:1] = ["-m", "cProfile", "-o", os.path.abspath(PROFILE)]
    elif GC_LOG:
        cmd[1:1] = [os.path.join(HERE, "gc_probe.py"), os.path.abspath(GC_LOG)]
    log_path = os.path.join(workdir.name, "server.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            ["taskset", "-c", cpus, *cmd],
            cwd=workdir.name,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=raise_fd_limit,
        )
    deadline = time.time() + 30
    text = ""
    while time.time() < deadline:
        with open(log_path) as fh:
            text = fh.read()
        if "listening on" in text:
            server = Server(name, proc, port, workdir, workers, redis=redis)
            if PYSPY:
                server.spy = subprocess.Popen(
                    [os.path.join(os.path.dirname(sys.executable), "py-spy"), "record"]
                    + ["--pid", str(proc.pid), "--format", "raw", "--threads", "--nonblocking"]
                    + ["--rate", "250", "-o", os.path.abspath(PYSPY)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            return server
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    if redis is not None:
        redis.kill()
        redis.wait()
    workdir.cleanup()
    raise RuntimeError(f"{name} did not start:\n{text}")


def start_redis(cpus: str) -> tuple[subprocess.Popen, int]:
    """A redis-server on loopback (no persistence) pinned to ``cpus``, once it answers."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("--workers N needs redis-server (the backplane)")
    port = free_port()
    proc = subprocess.Popen(
        ["taskset", "-c", cpus, binary, "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    proc.wait()
    raise RuntimeError("redis-server did not start")


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def launch_for_fanout(name: str, cpus: str, workers: int, clients: int) -> Server:
    return launch(
        name,
        cpus,
        workers,
        dev="true",
        realtime_max_connections=clients + 10,
        realtime_stats_interval=3600,
        realtime_heartbeat_interval=3600,
        realtime_client_timeout=3600,  # protocol pings are answered, but rarely sent
        auth_connect_attempts_per_ip=clients * 2 + 10,
        auth_max_connections_per_identity=clients + 10,
        server_max_connections_per_ip=clients + 100,
    )


# -- load generator ----------------------------------------------------------------------
class Tracker:
    """Arrival times per seq, shared by every client; resolves a waiter once all arrived."""

    def __init__(self) -> None:
        self.arrivals: dict[int, list[float]] = {}
        self.target = 0
        self.waiters: dict[int, asyncio.Future] = {}

    def arrived(self, seq: int, now: float) -> None:
        times = self.arrivals.get(seq)
        if times is None:
            times = self.arrivals[seq] = []
        times.append(now)
        if len(times) >= self.target and seq in self.waiters:
            waiter = self.waiters.pop(seq)
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, seq: int, timeout: float) -> None:
        if len(self.arrivals.get(seq, ())) >= self.target:
            return
        waiter = self.waiters[seq] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            self.waiters.pop(seq, None)


class StreamClient(asyncio.Protocol):
    """One WebSocket or SSE subscriber: handshake, then note the arrival of each event."""

    def __init__(self, tracker: Tracker, transport_kind: str, request: bytes):
        self.tracker = tracker
        self.ws = transport_kind == "ws"
        self.request = request
        self.ready = asyncio.get_running_loop().create_future()
        self.buffer = b""
        self.open = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("closed during the handshake"))

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buffer = self.buffer + data if self.buffer else data
        if not self.open:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            status = buffer[: buffer.find(b"\r\n")]
            expected = b" 101 " if self.ws else b" 200 "
            if expected not in status:
                self.ready.set_exception(ConnectionError(status.decode()))
                self.transport.close()
                return
            self.open = True
            self.ready.set_result(None)
            buffer = buffer[end + 4 :]
        if self.ws:
            self.buffer = self._frames(buffer, now)
        else:
            end = buffer.rfind(b"\n\n")
            if end < 0:
                self.buffer = buffer
                return
            for match in SSE_EVENT.finditer(buffer, 0, end):
                self.tracker.arrived(int(match.group(1)), now)
            self.buffer = buffer[end + 2 :]

    def _frames(self, buffer: bytes, now: float) -> bytes:
        pos, size = 0, len(buffer)
        while size - pos >= 2:
            length = buffer[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 4], "big")
                start = pos + 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buffer[pos + 2 : pos + 10], "big")
                start = pos + 10
            if size < start + length:
                break
            match = WS_EVENT.match(buffer, start, start + 60)
            if match:
                self.tracker.arrived(int(match.group(1)), now)
            elif buffer[pos] & 0x0F == 0x9 and length < 126:  # ping: masked pong, zero mask
                self.transport.write(
                    bytes((0x8A, 0x80 | length, 0, 0, 0, 0)) + buffer[start : start + length]
                )
            pos = start + length
        return buffer[pos:] if pos < size else b""


def upgrade_request(server: Server, transport: str) -> bytes:
    path = server.paths(transport)
    auth = f"Authorization: Bearer {TOKEN}\r\n"
    if transport == "ws":
        key = base64.b64encode(os.urandom(16)).decode()
        return (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"{auth}\r\n"
        ).encode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nAccept: text/event-stream\r\n"
        f"{auth}\r\n"
    ).encode()


def source_address(i: int) -> tuple[str, int]:
    return (f"127.0.0.{2 + i % 200}", 0)


async def connect_clients(
    server: Server, transport: str, tracker: Tracker, start: int, count: int
) -> list[StreamClient]:
    loop = asyncio.get_running_loop()
    clients: list[StreamClient] = []

    async def one(i: int) -> StreamClient:
        request = upgrade_request(server, transport)
        _, proto = await loop.create_connection(
            lambda: StreamClient(tracker, transport, request),
            "127.0.0.1",
            server.port,
            local_addr=source_address(i),
        )
        await asyncio.wait_for(proto.ready, 30)
        return proto

    for batch in range(start, start + count, 200):
        end = min(batch + 200, start + count)
        clients.extend(await asyncio.gather(*(one(i) for i in range(batch, end))))
    return clients


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


async def fanout(
    name: str,
    transport: str,
    sizes: list[int],
    events: dict[int, int],
    server_cpus: str,
    workers: int = 1,
    payload: int = 200,
) -> list[dict]:
    """One server; clients added up to each size in turn; ``events`` triggers per size."""
    server = launch_for_fanout(name, server_cpus, workers, max(sizes))
    results = []
    try:
        await asyncio.sleep(1.0)
        rss_empty = server.rss()
        tracker = Tracker()
        clients: list[StreamClient] = []
        trigger_port, trigger_path = server.trigger
        note = "x" * payload
        for size in sizes:
            began = time.perf_counter()
            clients += await connect_clients(
                server, transport, tracker, len(clients), size - len(clients)
            )
            connect_s = time.perf_counter() - began
            # A fresh trigger connection: connecting thousands can outlast an idle timeout.
            http = HttpClient(trigger_port, source_address(0))
            await http.open()
            await asyncio.sleep(1.0 + size / 5000)  # welcome and snapshot writes settle
            rss = server.rss()
            tracker.target = size
            sent: dict[int, float] = {}
            cpu_server, cpu_client = server.cpu(), own_cpu()
            for i in range(events[size]):
                body = json.dumps({"type": "quota_change", "data": {"i": i, "note": note}})
                t0 = time.perf_counter()
                status, reply = await http.post(trigger_path, body.encode())
                if status != 200:
                    raise RuntimeError(f"trigger answered {status}: {reply[:200]!r}")
                seq = json.loads(reply)["seq"]
                sent[seq] = t0
                await tracker.wait(seq, 10)
                if len(tracker.arrivals.get(seq, ())) < size:
                    break  # a client was lost: the rest would only time out too
                await asyncio.sleep(0.02)
            cpu_server = server.cpu() - cpu_server
            cpu_client = own_cpu() - cpu_client
            http.close()
            latencies, last = [], []
            delivered = 0
            for seq, t0 in sent.items():
                times = tracker.arrivals.get(seq, [])
                delivered += len(times)
                latencies.extend(t - t0 for t in times)
                if times:
                    last.append(max(times) - t0)
            results.append(
                {
                    "server": server.label,
                    "transport": transport,
                    "clients": size,
                    "events": len(sent),
                    "delivered": delivered,
                    "expected": size * len(sent),
                    "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
                    "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
                    "last_ms": round(percentile(last, 0.50) * 1000, 2),
                    "max_ms": round(max(latencies) * 1000, 2) if latencies else None,
                    "server_cpu_ms_per_event": round(cpu_server / len(sent) * 1000, 2),
                    "client_cpu_ms_per_event": round(cpu_client / len(sent) * 1000, 2),
                    "rss_mib": round(rss / 2**20, 1),
                    "rss_kib_per_conn": round((rss - rss_empty) / size / 1024, 1),
                    "connect_s": round(connect_s, 1),  # the clients added for this size
                }
            )
            print(json.dumps(results[-1]), flush=True)
        for client in clients:
            client.transport.close()
    finally:
        server.stop()
    return results


def start_postgres(cpus: str) -> tuple[Any, str]:
    """A throw-away PostgreSQL cluster (tests/services.py: fsync off) pinned to ``cpus``
    (its backends are forked from the pinned postmaster); returns it and a database URL."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from services import Postgres

    pg = Postgres()
    pg.start()
    with open(os.path.join(pg.data, "postmaster.pid"), encoding="ascii") as fh:
        postmaster = psutil.Process(int(fh.readline()))
    for process in [postmaster, *postmaster.children(recursive=True)]:
        process.cpu_affinity([int(c) for c in cpus.split(",")])
    return pg, pg.create_database()


async def consume(
    name: str,
    connections: int,
    seconds: float,
    server_cpus: str,
    workers: int = 1,
    database_url: str | None = None,
    batch: int = 0,
    plugins_dir: str | None = None,
) -> dict:
    """``connections`` keep-alive clients consuming as fast as answers come back; with
    ``batch`` (quotaserver), each request is a batch of that many decisions; with
    ``plugins_dir``, quotaserver loads the plugin files there too."""
    # The run saturates the server's core on purpose: load shedding (503 at high CPU) would
    # measure the throttle, not the path.
    settings: dict[str, Any] = {}
    if database_url:
        settings = {"database_url": database_url, "database_pool_size": POOL_SIZE}
    if plugins_dir:
        settings["plugins_dir"] = plugins_dir
    server = launch(
        name,
        server_cpus,
        workers,
        database_sqlite_synchronous="full",
        throttle_cpu_bands="[[100, 1.0]]",
        **settings,
    )
    try:
        latencies: list[float] = []
        codes: dict[int, int] = {}
        errors: dict[int, str] = {}  # one answer per unexpected status, for the report
        path = "/api/quotas/consume/batch" if batch else server.consume_path

        def decision(rng: random.Random) -> dict:
            return {"user": f"user{rng.randrange(5000)}", "command_type": rng.choice(COMMANDS)}

        async def worker(index: int, stop_at: float) -> None:
            rng = random.Random(index)
            http = HttpClient(server.port, source_address(index))
            await http.open()
            while time.perf_counter() < stop_at:
                if batch:
                    body = json.dumps({"decisions": [decision(rng) for _ in range(batch)]})
                else:
                    body = json.dumps(decision(rng))
                body = body.encode()
                t0 = time.perf_counter()
                status, reply = await http.post(path, body)
                latencies.append(time.perf_counter() - t0)
                codes[status] = codes.get(status, 0) + 1
                if status != 200:
                    errors.setdefault(status, reply[:300].decode(errors="replace"))
            http.close()

        await worker(10_000, time.perf_counter() + 1.0)  # warm-up: first requests, caches
        latencies.clear()
        codes.clear()
        cpu_server, cpu_client = server.cpu(), own_cpu()
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.gather(*(worker(i, stop_at) for i in range(connections)))
        elapsed = time.perf_counter() - started
        cpu_server = server.cpu() - cpu_server
        result = {
            "server": server.label,
            "database": "postgresql" if database_url else "sqlite",
            "connections": connections,
            "seconds": round(elapsed, 1),
            "requests": len(latencies),
            "requests_per_s": round(len(latencies) / elapsed, 1),
            "batch": batch or None,
            "decisions_per_s": round(len(latencies) * max(batch, 1) / elapsed, 1),
            "status_counts": {str(k): v for k, v in sorted(codes.items())},
            "errors": {str(k): v for k, v in errors.items()},
            "p50_ms": round(percentile(latencies, 0.50) * 1000, 2),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 2),
            "server_cpu_s": round(cpu_server, 2),
            # Robust to other load on the machine, unlike requests/s.
            "server_cpu_ms_per_request": round(cpu_server / max(len(latencies), 1) * 1000, 3),
            "server_cpu_ms_per_decision": round(
                cpu_server / max(len(latencies) * max(batch, 1), 1) * 1000, 4
            ),
            "client_cpu_s": round(own_cpu() - cpu_client, 2),
        }
        print(json.dumps(result), flush=True)
        return result
    finally:
        server.stop()


def use_uvloop() -> str:
    try:
        import uvloop
    except ImportError:  # the bench extra is not installed: the stock loop still works
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    fan = sub.add_parser("fanout")
    fan.add_argument("--server", choices=SERVERS, default="quotaserver")
    fan.add_argument("--transport", choices=("ws", "sse"), default="ws")
    fan.add_argument("--sizes", default="100,1000")
    fan.add_argument("--events", type=int, help="events per size (default: by size)")
    con = sub.add_parser("consume")
    con.add_argument("--server", choices=("quotaserver", "tornado"), default="quotaserver")
    con.add_argument("--connections", type=int, default=32)
    con.add_argument("--seconds", type=float, default=10.0)
    con.add_argument(
        "--postgres",
        action="store_true",
        help="quotaserver on its own PostgreSQL cluster (pinned to --postgres-cpus)",
    )
    con.add_argument("--postgres-cpus", help="PostgreSQL's cores (default: the server's)")
    con.add_argument(
        "--pool-size", type=int, default=8, help="database.pool_size (its workers divide it)"
    )
    con.add_argument("--batch", type=int, default=0, help="decisions per request (batch)")
    con.add_argument("--plugins-dir", help="quotaserver also loads the plugin files here")
    for p in (fan, con):
        p.add_argument("--server-cpus", default="0")
        p.add_argument("--client-cpus", default="1")
        p.add_argument("--workers", type=int, default=1, help="quotaserver run.py --workers")
        p.add_argument("--profile", help="run the server under cProfile; write its stats here")
        p.add_argument("--py-spy", help="sample the server with py-spy; collapsed stacks here")
        p.add_argument("--gc-log", help="record the server's garbage-collector pauses here")
    args = parser.parse_args()
    global PROFILE, PYSPY, GC_LOG, POOL_SIZE
    PROFILE, PYSPY, GC_LOG = args.profile, args.py_spy, args.gc_log
    POOL_SIZE = getattr(args, "pool_size", POOL_SIZE)
    raise_fd_limit()
    pin(args.client_cpus)
    use_uvloop()
    if args.what == "fanout":
        sizes = [int(s) for s in args.sizes.split(",")]
        events = {s: args.events or EVENTS.get(s, 20) for s in sizes}
        asyncio.run(
            fanout(args.server, args.transport, sizes, events, args.server_cpus, args.workers)
        )
    else:
        pg, url = (
            start_postgres(args.postgres_cpus or args.server_cpus)
            if args.postgres
            else (None, None)
        )
        try:
            asyncio.run(
                consume(
                    args.server,
                    args.connections,
                    args.seconds,
                    args.server_cpus,
                    args.workers,
                    url,
                    args.batch,
                    args.plugins_dir,
                )
            )
        finally:
            if pg is not None:
                pg.destroy()


if __name__ == "__main__":
    main()
