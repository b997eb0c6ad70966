"""Behaviours the docs promise that had no test: headers, idempotent alert actions, hourly
windows, subscribe edge cases, the SSE close event and slow-consumer drop, shutting down,
and tokens taken from the environment."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from datetime import UTC, datetime

import pytest
from clients import (
    ADMIN,
    SERVICE,
    VIEWER,
    call,
    consume,
    raw_request,
    sse_connect,
    ws_connect,
)
from conftest import ROOT, FakeClock, sha
from waits import wait_until

from quotaserver.auth import Auth
from quotaserver.config import ConfigError
from quotaserver.models import AuditLog

API = "/api/admin/quotas"
PLUGIN_GATE = """
import asyncio
from quotaserver import hookimpl

@hookimpl
async def startup(app):
    app.plugin_state("gate")["release"] = asyncio.Event()

@hookimpl
async def shutdown(app):
    await app.plugin_state("gate")["release"].wait()  # the test decides when stop goes on
"""


# -- headers ---------------------------------------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_every_api_response_forbids_framing_and_caching(app_factory):
    app = await app_factory()
    responses = [
        await call(app, "GET", "/api/health", token=None),
        await call(app, "GET", f"{API}/stats", token=VIEWER),
        await consume(app, "hal"),
        await call(app, "GET", f"{API}/users?page=0", token=VIEWER),  # 400
        await call(app, "GET", f"{API}/stats", token=None),  # 401
        await call(app, "GET", "/api/nowhere", token=None),  # 404
    ]
    assert [r.code for r in responses] == [200, 200, 200, 400, 401, 404]
    for resp in responses:
        assert resp.headers["X-Frame-Options"] == "DENY", resp
        assert resp.headers["Cache-Control"] == "no-store", resp
        assert resp.headers["X-Content-Type-Options"] == "nosniff", resp
        assert resp.headers["Content-Type"] == "application/json; charset=utf-8", resp


@pytest.mark.gen_test(timeout=30)
async def test_the_sse_stream_is_neither_buffered_by_proxies_nor_cached(app_factory):
    app = await app_factory()
    head = await raw_request(app, "GET", "/sse/admin/quotas", {"Authorization": f"Bearer {VIEWER}"})
    assert head.code == 200
    assert head.headers["Content-Type"] == "text/event-stream; charset=utf-8"
    assert head.headers["X-Accel-Buffering"] == "no"
    assert head.headers["Cache-Control"] == "no-cache"
    assert head.headers["X-Frame-Options"] == "DENY"


# -- alerts ----------------------------------------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_acknowledge_and_resolve_are_idempotent_and_an_unknown_alert_is_404(app_factory):
    app = await app_factory(plugins={"alert_engine": {"enabled": False}})
    alert = await app.alerts.raise_alert("manual", "high", "look at this")
    path = f"{API}/alerts/{alert['alert_id']}"

    async def audits() -> int:
        return await app.store.run(lambda: AuditLog.select().count())

    first = await call(app, "POST", f"{path}/acknowledge")
    assert first.code == 200 and first.json["status"] == "acknowledged"
    seq, audited = app.hub.last_seq, await audits()
    again = await call(app, "POST", f"{path}/acknowledge", token=ADMIN)
    assert again.code == 200 and again.json["status"] == "acknowledged"
    assert again.json["updated_at"] == first.json["updated_at"]
    assert (app.hub.last_seq, await audits()) == (seq, audited)  # no event, no audit row

    resolved = await call(app, "POST", f"{path}/resolve")
    assert resolved.json["status"] == "resolved"
    seq, audited = app.hub.last_seq, await audits()
    for action in ("resolve", "acknowledge"):  # a resolved alert stays resolved
        resp = await call(app, "POST", f"{path}/{action}")
        assert resp.code == 200 and resp.json["status"] == "resolved"
        assert resp.json["updated_at"] == resolved.json["updated_at"]
    assert (app.hub.last_seq, await audits()) == (seq, audited)

    for missing in (alert["alert_id"] + 1000, 0):
        resp = await call(app, "POST", f"{API}/alerts/{missing}/resolve")
        assert resp.code == 404
        assert resp.json["error"]["code"] == "unknown_alert"


# -- hourly windows --------------------------------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_hourly_windows_end_to_end_and_ratelimit_names_the_tightest(app_factory):
    clock = FakeClock(datetime(2026, 3, 10, 12, 10, tzinfo=UTC))
    app = await app_factory(clock=clock, quotas__periods=["hourly", "daily", "weekly", "monthly"])
    await app.rules.set_global_limits("shell", {"hourly": 2, "daily": 3}, actor="test")
    first = await consume(app, "ivy")
    assert first.json["periods"]["hourly"] == {
        "limit": 2, "used": 1, "remaining": 1, "resets_at": "2026-03-10T13:00:00.000Z",
    }  # fmt: skip
    # Hourly has the least remaining (1 against 2): the headers follow it.
    assert first.headers["RateLimit-Limit"] == "2"
    assert first.headers["RateLimit-Remaining"] == "1"
    assert first.headers["RateLimit-Reset"] == str(50 * 60)
    assert (await consume(app, "ivy")).code == 200
    denied = await consume(app, "ivy")
    assert denied.code == 429
    assert denied.json["violation"]["period"] == "hourly"
    assert denied.headers["Retry-After"] == str(50 * 60)

    clock.set(datetime(2026, 3, 10, 13, 0, tzinfo=UTC))  # a new hour, the same day
    later = await consume(app, "ivy")
    assert later.code == 200
    assert later.json["periods"]["hourly"]["used"] == 1
    assert later.json["periods"]["daily"]["used"] == 3
    # Now the day is the tighter one: 0 left against the hour's 1.
    assert later.headers["RateLimit-Limit"] == "3"
    assert later.headers["RateLimit-Remaining"] == "0"
    assert later.headers["RateLimit-Reset"] == str(11 * 3600)
    over = await consume(app, "ivy")
    assert over.code == 429 and over.json["violation"]["period"] == "daily"


# -- subscribe edge cases ----------------------------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_subscribe_to_nothing_means_everything_and_unknown_types_are_refused(app_factory):
    app = await app_factory()
    ws = await ws_connect(app, "types=alert")
    await ws.recv_type("welcome")
    await ws.send({"type": "subscribe", "types": ["violation", "No Such Type"]})
    error = await ws.recv_type("error")
    assert error["data"]["code"] == "invalid_types"
    # A well-formed name that no one declared is refused the same way, and says so.
    await ws.send({"type": "subscribe", "types": ["violation", "foo"]})
    error = await ws.recv_type("error")
    assert error["data"]["code"] == "invalid_types"
    assert "unknown event type foo" in error["data"]["message"]
    # The refused subscribes changed nothing: still only alerts.
    await app.publish_event("quota_change", {"n": 1})
    await app.alerts.raise_alert("manual", "low", "marker")
    assert (await ws.recv())["type"] == "alert"
    await ws.send({"type": "subscribe", "types": []})
    assert (await ws.recv_type("subscribed"))["data"]["types"] is None
    message = await app.publish_event("quota_change", {"n": 2})
    got = await ws.recv_type("quota_change")
    assert got["seq"] == message.seq
    ws.close()


# -- shutdown ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("code", "reason"), [(1001, "server shutting down"), (1012, "restart")])
@pytest.mark.gen_test(timeout=30)
async def test_shutdown_ends_sse_with_a_close_event_naming_the_code(app_factory, code, reason):
    app = await app_factory()
    sse = await sse_connect(app)
    await sse.next_type("welcome")
    if code == 1001:
        await app.stop()  # the default: SIGINT
    else:
        await app.stop(code=1012, reason="restart")
    await asyncio.wait_for(sse.fetch, 30)
    assert sse.all[-1]["event"] == "close"
    assert sse.all[-1]["message"]["data"] == {"code": code, "reason": reason}


async def open_keepalive(app) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that has served one request and stays open for the next."""
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    writer.write(f"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1:{app.port}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))  # fmt: skip
    await reader.readexactly(length)
    return reader, writer


@pytest.mark.gen_test(timeout=30)
async def test_a_stream_asked_for_on_a_kept_alive_connection_during_shutdown_is_503(
    app_factory, tmp_path
):
    plugins = tmp_path / "gate_plugins"
    plugins.mkdir()
    (plugins / "gate.py").write_text(PLUGIN_GATE)
    app = await app_factory(plugins_dir=str(plugins))
    sse_conn = await open_keepalive(app)
    ws_conn = await open_keepalive(app)
    stopping = asyncio.ensure_future(app.stop(code=1012, reason="restart"))
    await wait_until(lambda: app.stopped, "the shutdown to begin")
    auth = f"Authorization: Bearer {ADMIN}\r\nHost: 127.0.0.1:{app.port}\r\n"
    upgrade = (
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )
    heads = []
    for (reader, writer), request in (
        (sse_conn, f"GET /sse/admin/quotas HTTP/1.1\r\n{auth}\r\n"),
        (ws_conn, f"GET /ws/admin/quotas HTTP/1.1\r\n{auth}{upgrade}\r\n"),
    ):
        writer.write(request.encode())
        heads.append(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10))
        body = await asyncio.wait_for(reader.read(4096), 10)
        assert b'"code": "shutting_down"' in body or b'"code":"shutting_down"' in body, body
        writer.close()
    for head in heads:
        assert head.startswith(b"HTTP/1.1 503 "), head
        assert b"\r\nRetry-After: 5\r\n" in head, head
    app.plugin_state("gate")["release"].set()
    await stopping


# -- the SSE slow consumer ----------------------------------------------------------------------
@pytest.mark.gen_test(timeout=120)
async def test_an_sse_client_that_stops_reading_is_dropped_and_others_keep_pace(app_factory):
    app = await app_factory(realtime__client_queue=20, realtime__client_queue_bytes=65536)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", app.port))
    reader, stuck = await asyncio.open_connection(sock=sock)
    stuck.write(
        f"GET /sse/admin/quotas HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {ADMIN}\r\n\r\n".encode()
    )
    assert b" 200 " in (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10))
    stuck.transport.pause_reading()
    healthy = await ws_connect(app, "types=quota_change")
    await healthy.recv_type("welcome")
    await wait_until(lambda: app.hub.count("sse") == 1, "the stuck SSE client in the hub")
    sent = 0
    while app.hub.slow_closed == 0 and sent < 3000:
        message = await app.publish_event("quota_change", {"note": "x" * 8000, "i": sent})
        sent += 1
        assert (await healthy.recv_type("quota_change", timeout=20))["seq"] == message.seq
    assert app.hub.slow_closed == 1, f"the stuck SSE client was never dropped after {sent}"
    await wait_until(lambda: app.hub.count("sse") == 0, "the SSE client to leave the hub")
    assert app.hub.count("websocket") == 1
    stuck.close()
    healthy.close()


# -- tokens from the environment -----------------------------------------------------------------
ENV_TOKEN = "ci-token-from-the-environment-0123456789"


@pytest.mark.gen_test(timeout=30)
async def test_a_token_named_by_an_environment_variable_works_with_its_role(app_factory):
    tokens = [{"name": "ci", "role": "viewer", "env": "QS_TEST_CI_TOKEN"},
              {"name": "test-service", "role": "service", "sha256": sha(SERVICE)}]  # fmt: skip
    app = await app_factory(auth__tokens=tokens, env={"QS_TEST_CI_TOKEN": ENV_TOKEN})
    assert (await call(app, "GET", f"{API}/stats", token=ENV_TOKEN)).code == 200
    write = await call(app, "PUT", f"{API}/rules/shell", {"limits": {"daily": 5}}, token=ENV_TOKEN)
    assert write.code == 403  # a viewer, as configured
    assert (await call(app, "GET", f"{API}/stats", token=ADMIN)).code == 401  # not configured


def test_an_unset_token_variable_is_a_config_error_naming_it(tmp_path):
    from conftest import make_config

    tokens = [{"name": "ci", "role": "viewer", "env": "QS_TEST_CI_TOKEN"}]
    with pytest.raises(ConfigError, match=r"^auth\.tokens: environment variable QS_TEST_CI_TOKEN"):
        Auth(make_config(tmp_path, auth__tokens=tokens), env={})
    config = tmp_path / "env-token.yaml"
    config.write_text(
        f"auth:\n  tokens:\n    - {{name: ci, role: viewer, env: QS_TEST_CI_TOKEN}}\n"
        f"database:\n  url: sqlite:///{tmp_path}/qs.db\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUOTASERVER_", "QS_TEST"))}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "run.py"), "--config", str(config), "--port", "0"],
        capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result
    assert "auth.tokens: environment variable QS_TEST_CI_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
