"""The reliability matrix of issue 10 (the rows that do not need a database fault).

Each test asserts correctness; the figures it prints (``-s``) are the ones in
docs/reliability.md, with the machine they were measured on.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import sqlite3
import sys
import time

import psutil
import pytest
from clients import ADMIN, consume, ws_connect
from services import Server, start_server
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from waits import wait_until

from quotaserver.realtime.messages import CLOSE_RESTART, CLOSE_SLOW_CONSUMER


async def start_process(cwd, **settings: str) -> Server:
    """run.py in ``cwd``: its own SQLite file (synchronous=full, the default)."""
    env = {
        "QUOTASERVER_ADMIN_TOKEN": ADMIN,
        "QUOTASERVER_THROTTLE_SOURCE": "off",
        "QUOTASERVER_SERVER_LOG_LEVEL": "warning",
        **settings,
    }
    return await start_server(str(cwd), {}, env=env)


def report(row: str, **figures) -> None:
    cpu = f"{psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB"
    print(f"\n[reliability] {row}: {json.dumps(figures)} ({cpu}, Python {sys.version.split()[0]})")


# -- kill -9 during a burst of consumes ----------------------------------------------------
@pytest.mark.gen_test(timeout=120)
async def test_kill_9_during_a_burst_loses_nothing_acknowledged(tmp_path):
    proc = await start_process(tmp_path)
    workers, acked, sent = 8, {}, {}
    http = AsyncHTTPClient()

    async def worker(user: str) -> None:
        acked[user] = sent[user] = 0
        body = json.dumps({"user": user, "command_type": "test", "count": 1})
        while True:
            sent[user] += 1
            request = HTTPRequest(
                proc.url + "/api/quotas/consume", method="POST", body=body,
                headers={"Authorization": f"Bearer {ADMIN}",
                         "Content-Type": "application/json"},
                request_timeout=10,
            )  # fmt: skip
            try:
                resp = await http.fetch(request, raise_error=False)
            except (OSError, HTTPClientError):
                return  # the server died under this request
            if resp.code != 200:
                return  # 599: the connection was cut
            acked[user] += 1

    tasks = [asyncio.ensure_future(worker(f"burst-{i}")) for i in range(workers)]
    await wait_until(lambda: sum(acked.values()) >= 400, "400 acknowledged consumes")
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    await asyncio.gather(*tasks)

    db = tmp_path / "data" / "quotaserver.db"
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        used = dict(
            conn.execute(
                'SELECT u.username, SUM(c.used) FROM "usage" c JOIN "user" u ON u.id = c.user_id '
                "WHERE c.period = 'daily' GROUP BY u.username"
            ).fetchall()
        )
    restarted = await start_process(tmp_path)
    try:
        lost_in_flight = 0
        for user in acked:
            assert acked[user] <= used.get(user, 0) <= sent[user], (user, acked, used, sent)
            resp = await consume(restarted, user, "test", token=ADMIN)
            assert resp.json["periods"]["daily"]["used"] == used.get(user, 0) + 1
            lost_in_flight += sent[user] - used.get(user, 0)
    finally:
        await restarted.stop()
    report(
        "kill -9 during a burst",
        acknowledged=sum(acked.values()),
        stored=sum(used.values()),
        sent=sum(sent.values()),
        in_flight_not_stored=lost_in_flight,
        integrity_check="ok",
    )


# -- SIGTERM with hundreds of dashboards ---------------------------------------------------
@pytest.mark.gen_test(timeout=180)
async def test_sigterm_with_300_dashboards_closes_all_with_1012_within_the_budget(tmp_path):
    proc = await start_process(
        tmp_path,
        QUOTASERVER_AUTH_CONNECT_ATTEMPTS_PER_IP="100000",
        QUOTASERVER_SERVER_MAX_CONNECTIONS_PER_IP="100000",
        QUOTASERVER_AUTH_MAX_CONNECTIONS_PER_IDENTITY="100000",
    )
    clients = []
    for _ in range(6):
        clients += await asyncio.gather(*[ws_connect(proc) for _ in range(50)])
    for client in clients:
        await client.recv_type("welcome", timeout=30)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    codes = await asyncio.gather(*[c.closed(timeout=15) for c in clients])
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    elapsed = time.monotonic() - started
    assert codes == [CLOSE_RESTART] * len(clients)
    assert elapsed < 10, f"{elapsed:.2f} s: beyond server.shutdown_timeout"
    report("SIGTERM with 300 dashboards", clients=len(clients), exit_seconds=round(elapsed, 2))


# -- connect/disconnect cycles -------------------------------------------------------------
async def raw_upgrade(port: int, rcvbuf: int | None = None):
    """A WebSocket handshake over a plain socket: the test controls reading and closing."""
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            "GET /ws/admin/quotas HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {ADMIN}\r\n\r\n"
        ).encode()
    )
    status = await reader.readuntil(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 101"), status
    return reader, writer


@pytest.mark.gen_test(timeout=600)
async def test_1500_connect_disconnect_cycles_return_to_baseline(app_factory):
    app = await app_factory(
        auth__connect_attempts_per_ip=1_000_000, auth__max_connections_per_identity=1_000_000
    )
    me = psutil.Process()

    async def cycle(i: int) -> None:
        if i % 2:
            ws = await ws_connect(app)
            await ws.recv_type("welcome")
            ws.close()  # a close handshake
            await ws.closed()
        else:
            reader, writer = await raw_upgrade(app.port)
            await reader.read(1)  # the welcome has started to arrive
            writer.transport.abort()  # no close frame: the TCP connection just ends

    async def run(n: int) -> None:
        for start in range(0, n, 10):
            await asyncio.gather(*[cycle(i) for i in range(start, start + 10)])
        await wait_until(lambda: not app.hub.clients, "every hub client to be gone")

    def port_sockets() -> int:
        # Both ends of every connection live in this process: the server's accepted sockets
        # (local port = app.port) and the clients' (remote port = app.port). Counting these,
        # not every descriptor, keeps the check about connections: under pytest-xdist the
        # worker also holds descriptors of its own that come and go.
        return sum(
            1
            for c in me.net_connections("tcp")
            if (c.laddr and c.laddr.port == app.port) or (c.raddr and c.raddr.port == app.port)
        )

    await run(100)  # warm-up: lazily created pools, caches and buffers
    fds, tasks, rss = port_sockets(), len(asyncio.all_tasks()), me.memory_info().rss
    await run(1500)
    await wait_until(lambda: port_sockets() <= fds, f"sockets on the app's port back to {fds}")
    await wait_until(lambda: len(asyncio.all_tasks()) <= tasks, f"tasks back to {tasks}")
    growth = me.memory_info().rss - rss
    assert app.hub.count() == 0
    assert growth < 32 * 2**20, f"RSS grew {growth / 2**20:.1f} MiB over 1,500 cycles"
    report(
        "1,500 WebSocket connect/disconnect cycles (half without close handshake)",
        sockets_after_minus_baseline=port_sockets() - fds,
        tasks_after_minus_baseline=len(asyncio.all_tasks()) - tasks,
        hub_clients=app.hub.count(),
        rss_growth_mib=round(growth / 2**20, 2),
    )


# -- a stalled reader ----------------------------------------------------------------------
@pytest.mark.gen_test(timeout=120)
async def test_a_stalled_reader_stays_within_its_cap_and_others_get_everything(app_factory):
    cap = 256 * 1024
    app = await app_factory(realtime__client_queue=10_000, realtime__client_queue_bytes=cap)
    normal = await ws_connect(app)
    await normal.recv_type("welcome")
    payload = "x" * 2000

    async def one_event(n: int) -> tuple[float, dict, dict]:
        message = await app.publish_event("bulk", {"n": n, "pad": payload})
        sent_at = time.monotonic()
        received = await normal.recv_type("bulk")
        return time.monotonic() - sent_at, message, received

    baseline = sorted([(await one_event(n))[0] for n in range(300)])
    (normal_client,) = app.hub.clients
    reader, writer = await raw_upgrade(app.port, rcvbuf=4096)  # never read from again
    await wait_until(lambda: app.hub.count() == 2, "the stalled client to attach")
    (stalled,) = app.hub.clients - {normal_client}
    peak, published, seqs, received_seqs = 0, 0, [], []
    latencies = []
    while not stalled.closed:
        assert published < 5000, "the stalled client was never closed"
        latency, message, received = await one_event(published)
        published += 1
        peak = max(peak, stalled.pending_bytes)
        # The cap holds at every step: pending bytes never exceed it by more than a message.
        assert stalled.pending_bytes <= cap + len(message.text)
        latencies.append(latency)
        seqs.append(message.seq)
        received_seqs.append((received["seq"], received["data"]["n"]))
    assert stalled not in app.hub.clients
    assert app.hub.slow_closed == 1
    # The stalled peer is told why, once it reads again.
    frames = await asyncio.wait_for(reader.read(), 10)
    assert CLOSE_SLOW_CONSUMER.to_bytes(2, "big") in frames
    writer.close()
    # The other client got every event the server published, in order, with its data.
    assert received_seqs == list(zip(seqs, range(published), strict=True))
    assert seqs == sorted(set(seqs))
    latencies.sort()

    def pct(values: list[float], q: float) -> float:
        return round(1000 * values[min(int(len(values) * q), len(values) - 1)], 2)

    report(
        "stalled reader",
        events_before_close=published,
        peak_pending_kib=round(peak / 1024, 1),
        cap_kib=cap // 1024,
        other_client_p50_ms=pct(latencies, 0.5),
        other_client_p99_ms=pct(latencies, 0.99),
        alone_p50_ms=pct(baseline, 0.5),
        alone_p99_ms=pct(baseline, 0.99),
    )
