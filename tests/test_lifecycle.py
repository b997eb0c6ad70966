"""The real process: start-up output, graceful shutdown on signals; dev endpoints; health."""

import asyncio
import os
import signal
import socket
import sys

import pytest
from clients import ADMIN, VIEWER, call, consume, sse_connect, ws_connect
from services import Server, start_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def processes(io_loop):
    """Server processes a test started: killed and reaped if the test left one running."""
    started: list[Server] = []
    yield started
    for server in started:
        if server.proc.returncode is None:
            server.kill()
            io_loop.run_sync(server.wait, timeout=30)


async def start(tmp_path, processes, *args) -> Server:
    env = {
        "QUOTASERVER_ADMIN_TOKEN": ADMIN,
        # The real process samples this machine's CPU; a busy test machine must not throttle it.
        "QUOTASERVER_THROTTLE_CPU_BANDS": "[[100, 1.0]]",
        "QUOTASERVER_THROTTLE_MEMORY_BANDS": "[[100, 1.0]]",
    }
    server = await start_server(str(tmp_path), {}, *args, env=env)
    processes.append(server)
    return server


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 1012), (signal.SIGINT, 1001)])
@pytest.mark.gen_test(timeout=60)
async def test_signal_closes_clients_and_exits_0(tmp_path, processes, sig, code):
    proc = await start(tmp_path, processes)
    assert proc.url == f"http://127.0.0.1:{proc.port}"
    ws = await ws_connect(proc)
    sse = await sse_connect(proc)
    await ws.recv_type("welcome")
    await sse.next_type("welcome")
    assert (await consume(proc, "zed", token=ADMIN)).code == 200
    # How long this takes is measured by bench/close_latency.py, not asserted here.
    proc.send_signal(sig)
    assert await ws.closed(timeout=30) == code
    await asyncio.wait_for(sse.fetch, 30)
    assert await proc.wait(30) == 0
    assert "Traceback" not in "".join(proc.output)


@pytest.mark.gen_test(timeout=60)
async def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await asyncio.create_subprocess_exec(
            sys.executable, os.path.join(ROOT, "run.py"), "--port", str(port),
            cwd=str(tmp_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(result.communicate(), 30)
    assert result.returncode == 1
    assert b"cannot listen" in err and b"Traceback" not in err


@pytest.mark.gen_test(timeout=30)
async def test_dev_endpoints_persist_and_publish_like_real_events(app_factory):
    app = await app_factory(dev=True)
    ws = await ws_connect(app)
    await ws.recv_type("welcome")
    violation = await call(app, "POST", "/api/ws/test-violation",
                           {"user": "dev-user", "command_type": "code"})  # fmt: skip
    assert violation.code == 200
    got = await ws.recv_type("violation")
    assert got["data"]["username"] == "dev-user" and got["seq"] >= 1
    alert = await call(app, "POST", "/api/ws/test-alert", {"severity": "critical"})
    assert alert.code == 200
    assert (await ws.recv_type("alert"))["data"]["severity"] == "critical"
    broadcast = await call(app, "POST", "/api/ws/test-broadcast",
                           {"type": "quota_change", "data": {"hello": 1}})  # fmt: skip
    assert broadcast.code == 200
    got = await ws.recv_type("quota_change")
    assert got["seq"] == broadcast.json["seq"] and got["data"]["hello"] == 1
    bad = await call(app, "POST", "/api/ws/test-broadcast", {"type": "stats"})
    assert bad.code == 400
    # Replayable from the event log like any event.
    again = await ws_connect(app, f"last_seq={got['seq'] - 3}")
    types = []
    while (msg := await again.recv())["type"] != "recovered":
        if "seq" in msg:
            types.append(msg["type"])
    assert types == ["violation", "alert", "quota_change"]
    ws.close()


@pytest.mark.gen_test(timeout=30)
async def test_stream_health_reports_clients_seq_and_sources(app_factory):
    app = await app_factory(realtime__max_connections=7)
    ws = await ws_connect(app)
    sse = await sse_connect(app)
    await ws.recv_type("welcome")
    await sse.next_type("welcome")
    message = await app.publish_event("quota_change", {"x": 1})
    health = (await call(app, "GET", "/api/ws/health", token=VIEWER)).json
    assert health["clients"] == {"websocket": 1, "sse": 1, "total": 2}
    assert health["max_connections"] == 7
    assert health["seq"] == message.seq
    assert health["broadcaster_running"] is True
    assert {s["name"] for s in health["sources"]} >= {"alert_rules"}
    for source in health["sources"]:
        assert {"last_run", "last_error", "healthy"} <= set(source)
    ws.close()
