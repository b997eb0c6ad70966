"""Both stream transports are admitted by one function and refuse the same inputs the same
way: the same HTTP status, error code and headers, before a 101 or the first SSE byte."""

import asyncio
import json

import pytest
from clients import ADMIN, SERVICE, VIEWER, call, sse_connect, ws_connect
from tornado.httputil import HTTPHeaders

from quotaserver.handlers.admission import Refusal
from quotaserver.realtime.messages import CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_TRY_AGAIN

MANY = 100_000
WS_UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}
PATHS = {"websocket": "/ws/admin/quotas", "sse": "/sse/admin/quotas"}


async def handshake(app, transport, query="", token=VIEWER, headers=None):
    """One stream request on a fresh socket: (status, headers, JSON body or None)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    try:
        hdrs = {"Host": f"127.0.0.1:{app.port}"}
        if transport == "websocket":
            hdrs.update(WS_UPGRADE)
        else:
            hdrs["Connection"] = "close"
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        hdrs.update(headers or {})
        path = PATHS[transport] + (f"?{query}" if query else "")
        head = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
        writer.write(head.encode("latin-1") + b"\r\n")
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status_line, _, rest = raw.decode("latin-1").partition("\r\n")
        status, parsed = int(status_line.split()[1]), HTTPHeaders.parse(rest)
        body = None
        if status not in (101, 200):
            length = int(parsed["Content-Length"])
            body = json.loads(await asyncio.wait_for(reader.readexactly(length), 10))
    finally:
        writer.close()
    return status, parsed, body


def outcome(result):
    status, headers, body = result
    kept = {k: headers[k] for k in ("Retry-After", "WWW-Authenticate") if k in headers}
    return status, (body or {}).get("error", {}).get("code"), kept


async def both(app, **kwargs):
    ws = outcome(await handshake(app, "websocket", **kwargs))
    sse = outcome(await handshake(app, "sse", **kwargs))
    assert ws == sse, (ws, sse)
    return ws


@pytest.mark.gen_test(timeout=60)
async def test_both_transports_refuse_the_same_inputs_the_same_way(app_factory):
    app = await app_factory(
        auth__connect_attempts_per_ip=MANY, auth__max_connections_per_identity=MANY
    )
    realm = {"WWW-Authenticate": 'Bearer realm="quotaserver"'}
    assert await both(app, token=None) == (401, "unauthorized", realm)
    assert await both(app, token="not-a-token") == (401, "unauthorized", realm)
    assert await both(app, token=SERVICE) == (403, "forbidden", {})
    foreign = {"Origin": "http://evil.example"}
    assert await both(app, headers=foreign) == (403, "forbidden_origin", {})
    # Origin comes before identity: a foreign page learns nothing about credentials.
    assert await both(app, token=None, headers=foreign) == (403, "forbidden_origin", {})
    assert await both(app, query="types=Not-A-Type") == (400, "invalid_types", {})
    # A well-formed name that nobody sends: a stream that would stay silent.
    assert await both(app, query="types=violation,foo") == (400, "invalid_types", {})
    # Shutting down: refused alike (the flag is what stop() sets first).
    app.stopped = True
    try:
        assert await both(app) == (503, "shutting_down", {"Retry-After": "5"})
    finally:
        app.stopped = False
    # And admitted alike.
    assert (await handshake(app, "websocket"))[0] == 101


@pytest.mark.gen_test(timeout=60)
async def test_caps_refuse_alike_before_the_upgrade(app_factory):
    app = await app_factory(
        auth__connect_attempts_per_ip=MANY,
        auth__max_connections_per_identity=1,
        realtime__max_connections=2,
    )
    viewer = await sse_connect(app, token=VIEWER)
    await viewer.next_type("welcome")
    # Per-identity cap first (429), then the instance's max_connections (503).
    assert await both(app, token=VIEWER) == (429, "too_many_connections", {})
    admin = await ws_connect(app, token=ADMIN)
    await admin.recv_type("welcome")
    assert app.hub.full
    # WebSocket used to upgrade and close with 1013 here; both now answer 503 first.
    created = await call(app, "POST", "/api/admin/tokens", {"name": "other", "role": "viewer"})
    refused = (503, "server_full", {"Retry-After": "5"})
    assert await both(app, token=created.json["token"]) == refused
    admin.close()


@pytest.mark.gen_test(timeout=60)
async def test_the_attempt_rate_limit_refuses_alike(app_factory):
    app = await app_factory(auth__connect_attempts_per_ip=2)
    assert (await handshake(app, "sse", token=None))[0] == 401  # attempts count, refused or not
    assert (await handshake(app, "websocket", token=None))[0] == 401
    ws = outcome(await handshake(app, "websocket"))
    sse = outcome(await handshake(app, "sse"))
    assert ws[:2] == sse[:2] == (429, "too_many_attempts")
    assert int(ws[2]["Retry-After"]) >= 1 and int(sse[2]["Retry-After"]) >= 1


def test_refusals_map_to_documented_close_codes():
    """After the upgrade (a race for the last slot), a refusal becomes a close code."""
    assert Refusal(503, "server_full", "full").close_code == CLOSE_TRY_AGAIN
    assert Refusal(429, "too_many_connections", "cap").close_code == CLOSE_TRY_AGAIN
    assert Refusal(401, "unauthorized", "who").close_code == CLOSE_POLICY
    assert Refusal(403, "forbidden_origin", "no").close_code == CLOSE_POLICY
    assert Refusal(503, "shutting_down", "bye").close_code == CLOSE_GOING_AWAY
