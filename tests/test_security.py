"""Security (issue 5): only the right people in, bad input out.

The role matrix is generated from the route table (quotaserver.urls.ROUTES + DEV_ROUTES),
so a route added later is checked without anyone remembering to: 401 without
credentials, 403 with a wrong role, neither with a right one; streams are refused before
the upgrade. Every check runs against the real server over real sockets.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import re
import sqlite3
import stat
import sys
import time
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import tornado.web
import tornado.websocket
from clients import (
    ADMIN,
    FORM,
    METRICS,
    SERVICE,
    VIEWER,
    Head,
    call,
    consume,
    cookies_of,
    login_post,
    raw_request,
    sse_connect,
    ws_connect,
)
from conftest import FakeClock, FakeMonotonic
from hypothesis import given, settings
from hypothesis import strategies as st
from routes import group_spans, implemented
from tornado.httpclient import HTTPClientError
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine
from waits import wait_until

from quotaserver import urls
from quotaserver.auth import ROLES, SESSION_COOKIE
from quotaserver.handlers.session import DEFAULT_NEXT, safe_next

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS = {"admin": ADMIN, "viewer": VIEWER, "service": SERVICE, "metrics": METRICS}
BAD_TOKEN = "not-a-token-but-a-guess-0123456789"

# Reviewed public routes: anything else that turns out public fails test_public_routes.
PUBLIC = {
    "/api/health",
    "/api/health/live",
    "/api/health/ready",
    "/api/openapi.json",
    "/login",
    "/",
}
# The only routes the service role may reach (issue 5: check/consume and a user's status;
# issue 21: refunds).
SERVICE_ROUTES = {
    "/api/quotas/check",
    "/api/quotas/consume",
    "/api/quotas/consume/batch",
    "/api/quotas/refund",
    "/api/quotas/users/([^/]+)",
}
# The only state-changing route a viewer may use.
VIEWER_WRITES = {("/logout", "POST")}

STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
# Values for path groups; the first that the group (and the route) accepts is used.
SAMPLES = ("alice", "shell", "daily", "1", "0123456789abcdef", "acknowledge", "resolve")
ALL_ROUTES = urls.ROUTES + urls.DEV_ROUTES
WS_UPGRADE = {
    "Upgrade": "websocket",
    "Connection": "Upgrade",
    "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version": "13",
}
MANY = 100_000  # connection limits out of the way of tests about something else


# -- helpers -----------------------------------------------------------------------------
def sample_path(pattern: str) -> str:
    """A concrete path that the route table sends to this route's handler."""
    spans = group_spans(pattern)
    starts = [0] + [end for _, end in spans]
    ends = [start for start, _ in spans] + [len(pattern)]
    literal = [pattern[a:b] for a, b in zip(starts, ends, strict=True)]
    for values in itertools.product(SAMPLES, repeat=len(spans)):
        path = literal[0].replace("\\", "")
        for value, rest in zip(values, literal[1:], strict=True):
            path += value + rest.replace("\\", "")
        first = next((p for p, _ in ALL_ROUTES if re.fullmatch(p, path)), None)
        if first == pattern:
            return path
    raise AssertionError(f"no sample value fits {pattern!r}: add one to SAMPLES")


class _NoConnection:
    context = None

    def set_close_callback(self, callback: Any) -> None:
        pass


def declared_roles(app: Any, cls: type, method: str, path: str) -> frozenset[str] | None:
    """The roles a handler declares for ``method``, read from a handler built for it."""
    start_line = RequestStartLine(method, path, "HTTP/1.1")
    request = HTTPServerRequest(
        start_line=start_line,
        headers=HTTPHeaders({"Host": "127.0.0.1"}),
        connection=_NoConnection(),
    )
    handler = cls(app.web, request, app=app)
    assert hasattr(handler, "roles_for"), f"{cls.__name__} declares no roles"
    return handler.roles_for(method)


def is_websocket(cls: type) -> bool:
    return issubclass(cls, tornado.websocket.WebSocketHandler)


def auth_headers(role: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[role]}"} if role else {}


async def browser_session(app: Any, token: str = ADMIN) -> dict[str, str]:
    """What a browser holds after signing in: session and XSRF cookies."""
    resp, xsrf = await login_post(app, token)
    assert resp.code == 302, resp
    return {SESSION_COOKIE: cookies_of(resp)[SESSION_COOKIE], "_xsrf": xsrf}


def cookie_header(jar: dict[str, str], xsrf: bool = True) -> dict[str, str]:
    headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in jar.items())}
    if xsrf:
        headers["X-XSRFToken"] = jar["_xsrf"]
    return headers


def refused_as_stranger(method: str, head: Head) -> bool:
    """401, or for a page the redirect to the login form."""
    if head.code == 401:
        return True
    location = head.headers.get("Location", "")
    return method in ("GET", "HEAD") and head.code == 302 and location.startswith("/login")


async def start(app_factory: Any, **overrides: Any) -> Any:
    values = {
        "dev": True,
        "auth__connect_attempts_per_ip": MANY,
        "auth__max_connections_per_identity": 1000,
    }
    values.update(overrides)
    return await app_factory(**values)


# -- the route matrix ----------------------------------------------------------------------
# Ids without backslashes: a node id must read back as itself (mutmut runs tests by id).
@pytest.mark.parametrize(
    ("pattern", "cls"), ALL_ROUTES, ids=[p.replace("\\", "") for p, _ in ALL_ROUTES]
)
@pytest.mark.gen_test(timeout=60)
async def test_role_matrix_over_every_route_and_method(app_factory, pattern, cls):
    app = await start(app_factory)
    path = sample_path(pattern)
    methods = implemented(cls)
    assert methods, f"{pattern}: the handler implements no method"
    problems = []
    for method in methods:
        roles = declared_roles(app, cls, method, path)
        if roles is None:
            assert pattern in PUBLIC, f"{method} {pattern} is public but not reviewed"
            continue
        ws = is_websocket(cls)
        body = b"{}" if method in ("POST", "PUT", "PATCH") else b""

        async def send(role: str | None, *, _method=method, _ws=ws, _body=body) -> Head:
            headers = {"Content-Type": "application/json", **auth_headers(role)}
            if _ws:
                headers.update(WS_UPGRADE)
            return await raw_request(app, _method, path, headers, _body)

        head = await send(None)
        if not refused_as_stranger(method, head) or head.code == 101:
            problems.append(f"{method} {path} without credentials: {head.code}")
        for role in ROLES:
            head = await send(role)
            if role == "admin" or role in roles:
                ok = head.code == 101 if ws else head.code not in (401, 403) and head.code < 500
                if not ok:
                    problems.append(f"{method} {path} as {role} (allowed): {head.code}")
            elif head.code != 403:
                problems.append(f"{method} {path} as {role} (not allowed): {head.code}")
    assert not problems, "\n".join(problems)


@pytest.mark.gen_test(timeout=60)
async def test_declared_roles_follow_the_role_model(app_factory):
    app = await start(app_factory)
    public, problems = set(), []
    for pattern, cls in ALL_ROUTES:
        path = sample_path(pattern)
        for method in implemented(cls):
            roles = declared_roles(app, cls, method, path)
            if roles is None:
                public.add(pattern)
                continue
            if "service" in roles and pattern not in SERVICE_ROUTES:
                problems.append(f"service may {method} {pattern}")
            viewer_write = "viewer" in roles and method in STATE_CHANGING
            if viewer_write and (pattern, method) not in VIEWER_WRITES:
                problems.append(f"viewer (read-only) may {method} {pattern}")
            if not roles <= set(ROLES):
                problems.append(f"{method} {pattern}: unknown roles {sorted(roles)}")
    assert public == PUBLIC
    assert not problems, "\n".join(problems)


@pytest.mark.gen_test(timeout=60)
async def test_cookie_sessions_need_the_xsrf_token_on_every_state_changing_route(app_factory):
    app = await start(app_factory)
    problems = []
    for pattern, cls in ALL_ROUTES:
        path = sample_path(pattern)
        for method in implemented(cls):
            if method not in STATE_CHANGING:
                continue
            public = declared_roles(app, cls, method, path) is None
            jar = await browser_session(app)
            body = b"{}" if method in ("POST", "PUT", "PATCH") else b""
            headers = {"Content-Type": "application/json", **cookie_header(jar, xsrf=False)}
            resp = await call(app, method, path, token=None, headers=headers, raw=body)
            if resp.code != 403 or resp.json["error"]["code"] != "xsrf":
                problems.append(f"{method} {path} without XSRF: {resp.code} {resp.body[:80]!r}")
            headers["X-XSRFToken"] = "2|00000000|" + "0" * 32 + "|1"
            resp = await call(app, method, path, token=None, headers=headers, raw=body)
            if resp.code != 403:
                problems.append(f"{method} {path} with a forged XSRF token: {resp.code}")
            if public:
                continue
            headers = {"Content-Type": "application/json", **cookie_header(jar)}
            resp = await call(app, method, path, token=None, headers=headers, raw=body)
            if resp.code in (401, 403) or resp.code >= 500:
                problems.append(f"{method} {path} with XSRF: {resp.code} {resp.body[:80]!r}")
    assert not problems, "\n".join(problems)


# -- streams: refused before the upgrade ---------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_foreign_origins_are_refused_before_the_upgrade(app_factory):
    app = await start(app_factory, auth__allowed_origins=["https://dash.example"])
    own = app.url
    foreign = [
        "http://evil.example",
        f"{own}.evil.example",  # prefix tricks: exact match only
        own.replace("http://", "https://"),
        "null",
    ]
    for origin in foreign:
        for role in ("admin", None):
            headers = {**WS_UPGRADE, "Origin": origin, **auth_headers(role)}
            head = await raw_request(app, "GET", "/ws/admin/quotas", headers)
            assert head.code == 403, (origin, role, head)
            head = await raw_request(
                app, "GET", "/sse/admin/quotas", {"Origin": origin, **auth_headers(role)}
            )
            assert head.code == 403, (origin, role, head)
    for origin in (own, "https://dash.example", "https://dash.example/"):
        headers = {**WS_UPGRADE, "Origin": origin, **auth_headers("viewer")}
        assert (await raw_request(app, "GET", "/ws/admin/quotas", headers)).code == 101
        headers = {"Origin": origin, **auth_headers("viewer")}
        assert (await raw_request(app, "GET", "/sse/admin/quotas", headers)).code == 200
    # The real client library sees the same refusal.
    with pytest.raises(HTTPClientError) as refused:
        await ws_connect(app, headers={"Origin": "http://evil.example"})
    assert refused.value.code == 403


@pytest.mark.gen_test(timeout=30)
async def test_missing_or_bad_credentials_are_refused_before_the_upgrade(app_factory):
    app = await start(app_factory)
    jar = await browser_session(app)
    session = f"{SESSION_COOKIE}={jar[SESSION_COOKIE]}"
    bad = [
        {},
        {"Authorization": f"Bearer {BAD_TOKEN}"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Basic {ADMIN}"},
        {"Authorization": f"Token {ADMIN}"},
        {"Cookie": f"{SESSION_COOKIE}=forged"},
        {"Cookie": f"{SESSION_COOKIE}={jar[SESSION_COOKIE][:-4]}AAAA"},  # bad signature
        # A bad bearer token is not rescued by a good cookie.
        {"Authorization": f"Bearer {BAD_TOKEN}", "Cookie": session},
    ]
    for headers in bad:
        head = await raw_request(app, "GET", "/ws/admin/quotas", {**WS_UPGRADE, **headers})
        assert head.code == 401, (headers, head)
        assert head.headers.get("WWW-Authenticate", "").startswith("Bearer")
        head = await raw_request(app, "GET", "/sse/admin/quotas", headers)
        assert head.code == 401, (headers, head)
    for token in (BAD_TOKEN, None):
        with pytest.raises(HTTPClientError) as refused:
            await ws_connect(app, token=token)
        assert refused.value.code == 401
    sse = await sse_connect(app, token=BAD_TOKEN)
    await asyncio.wait_for(sse.fetch, 5)
    assert sse.code == 401 and sse.all == []
    # The service role is authenticated but not allowed: 403, still before the upgrade.
    with pytest.raises(HTTPClientError) as refused:
        await ws_connect(app, token=SERVICE)
    assert refused.value.code == 403
    # And the real thing works with a token or with the session cookie.
    for kwargs in ({"token": VIEWER}, {"token": None, "headers": cookie_header(jar)}):
        ws = await ws_connect(app, **kwargs)
        assert (await ws.recv_type("welcome"))["data"]["transport"] == "websocket"
        ws.close()


# -- secrets stay secret -------------------------------------------------------------------
@pytest.mark.gen_test(timeout=60)
async def test_tokens_never_reach_logs_error_messages_or_responses(app_factory, caplog):
    caplog.set_level(logging.DEBUG)
    app = await start(app_factory, server__log_level="debug")
    secrets_seen = [ADMIN, VIEWER, SERVICE, BAD_TOKEN]
    responses: list[Any] = []

    async def keep(awaitable: Any) -> Any:
        resp = await awaitable
        responses.append(resp)
        return resp

    await keep(call(app, "GET", "/api/ws/health", token=ADMIN))
    await keep(call(app, "GET", "/api/ws/health", token=BAD_TOKEN))
    await keep(call(app, "GET", f"/api/ws/health?token={ADMIN}", token=None))
    await keep(consume(app, "alice", token=SERVICE))
    await keep(consume(app, "alice", token=BAD_TOKEN))
    await keep(
        call(app, "POST", "/api/quotas/consume", raw=f'{{"user": "{SERVICE}"', token=SERVICE)
    )
    await keep(call(app, "GET", f"/login?token={quote(ADMIN)}&next=/x", token=None))
    await keep(call(app, "GET", f"/login?token={quote(BAD_TOKEN)}", token=None))
    await keep(call(app, "GET", f"/login?token={quote(SERVICE)}", token=None))
    jar = await browser_session(app, VIEWER)
    form = f"token={quote(BAD_TOKEN)}&_xsrf={jar['_xsrf']}".encode()
    headers = {**cookie_header(jar), "Content-Type": FORM}
    await keep(call(app, "POST", "/login", raw=form, token=None, headers=headers))
    headers = {"Content-Type": FORM}  # no XSRF: refused before the token is looked at
    await keep(call(app, "POST", "/login", raw=f"token={ADMIN}", token=None, headers=headers))
    created = await call(app, "POST", "/api/admin/tokens", {"name": "ci", "role": "viewer"})
    new_token = created.json["token"]
    secrets_seen.append(new_token)
    await keep(call(app, "GET", "/api/admin/tokens"))
    await keep(call(app, "GET", "/api/ws/health", token=new_token))
    for token in (BAD_TOKEN, new_token):
        with pytest.raises(HTTPClientError):
            await ws_connect(app, token=token, headers={"Origin": "http://evil.example"})
    ws = await ws_connect(app, token=new_token, query=f"token={new_token}")
    await ws.recv_type("welcome")
    await ws.send({"type": "subscribe", "types": [new_token]})
    responses.append(await ws.recv_type("error"))
    ws.close()
    sse = await sse_connect(app, token=BAD_TOKEN, query=f"token={BAD_TOKEN}")
    await asyncio.wait_for(sse.fetch, 5)
    token_id = created.json["token_id"]
    await keep(call(app, "DELETE", f"/api/admin/tokens/{token_id}"))
    await keep(call(app, "GET", "/api/ws/health", token=new_token))
    # Malformed requests are logged by Tornado itself, with the offending header value.
    for value in (f"Bearer {ADMIN}\x01", f"Bearer {new_token}\x7f"):
        raw = f"Authorization: {value}\r\n".encode("latin-1")
        assert (await raw_request(app, "GET", "/api/ws/health", raw_headers=raw)).code == 400
    await raw_request(app, "GET", f"/nowhere?token={ADMIN}")
    # Every connection is over and the last request's access line is in: nothing is late.
    await wait_until(lambda: app.hub.count() == 0, "the streams to close")
    await wait_until(
        lambda: any("/nowhere" in r.getMessage() for r in caplog.records),
        "the access log line of the last request",
    )

    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records) + caplog.text
    assert "GET /api/ws/health" in logged  # the access log was captured
    for secret in secrets_seen:
        assert secret not in logged, f"a token was logged: {secret[:6]}..."
    for resp in responses:
        text = (
            json.dumps(resp)
            if isinstance(resp, dict)
            else resp.body.decode() + str(list(resp.headers.get_all()))
        )
        for secret in secrets_seen:
            assert secret not in text, (resp, secret[:6])
    # The one response that carries a token is its creation, once.
    assert created.code == 201 and new_token.startswith("qs_")


# -- limits --------------------------------------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_a_65_kib_websocket_message_closes_1009(app_factory):
    app = await start(app_factory)
    ws = await ws_connect(app)
    await ws.recv_type("welcome")
    await ws.send("x" * 65536)  # exactly 64 KiB is allowed: answered, connection kept
    assert (await ws.recv_type("error"))["data"]["code"] == "invalid_json"
    await ws.send("x" * (65 * 1024))
    assert await ws.closed() == 1009
    other = await ws_connect(app)
    assert (await other.recv_type("welcome"))["type"] == "welcome"


@pytest.mark.gen_test(timeout=30)
async def test_a_message_flood_closes_1008_and_others_are_served(app_factory):
    # The slowest refill allowed (0.1/s): however slow the machine, the flood below takes
    # far less than the 10 s one more token would need, so exactly the burst is answered.
    app = await start(app_factory, auth__ws_message_rate=0.1, auth__ws_message_burst=10)
    calm = await ws_connect(app, token=VIEWER)
    await calm.recv_type("welcome")
    flood = await ws_connect(app)
    await flood.recv_type("welcome")
    for _ in range(50):
        await flood.send({"type": "ping"})
    assert await flood.closed() == 1008
    pongs = [m for m in flood.messages if m["type"] == "pong"]
    assert len(pongs) == 10
    await calm.send({"type": "ping"})
    assert (await calm.recv_type("pong"))["type"] == "pong"
    # Up to the burst nothing happens; one more is refused.
    steady = await ws_connect(app)
    await steady.recv_type("welcome")
    for _ in range(10):
        await steady.send({"type": "ping"})
        await steady.recv_type("pong")
    await steady.send({"type": "ping"})
    assert await steady.closed() == 1008


@pytest.mark.gen_test(timeout=30)
async def test_connection_attempts_per_address_are_rate_limited(app_factory):
    app = await app_factory(auth__connect_attempts_per_ip=4, auth__connect_window=10.0)
    clock = FakeMonotonic()
    app.limiter.clock = clock  # time moves when the test says so
    sse = await raw_request(app, "GET", "/sse/admin/quotas", auth_headers("admin"))
    assert sse.code == 200
    # Failed handshakes count too: guessing is throttled like connecting.
    assert (await raw_request(app, "GET", "/ws/admin/quotas", WS_UPGRADE)).code == 401
    bad = {"Authorization": f"Bearer {BAD_TOKEN}"}
    assert (await raw_request(app, "GET", "/sse/admin/quotas", bad)).code == 401
    clock.advance(3.5)
    ws = await raw_request(app, "GET", "/ws/admin/quotas", {**WS_UPGRADE, **auth_headers("admin")})
    assert ws.code == 101
    for path, extra in (("/ws/admin/quotas", WS_UPGRADE), ("/sse/admin/quotas", {})):
        head = await raw_request(app, "GET", path, {**extra, **auth_headers("admin")})
        assert head.code == 429, head
        assert head.headers["Retry-After"] == "7"  # the first attempt leaves in 6.5 s
    # Other routes are not affected, and the address gets in again after the window.
    assert (await call(app, "GET", "/api/ws/health")).code == 200
    clock.advance(6.4)
    head = await raw_request(
        app, "GET", "/ws/admin/quotas", {**WS_UPGRADE, **auth_headers("admin")}
    )
    assert head.code == 429 and head.headers["Retry-After"] == "1"
    clock.advance(0.1)  # the first attempt is now a full window old
    ws = await raw_request(app, "GET", "/ws/admin/quotas", {**WS_UPGRADE, **auth_headers("admin")})
    assert ws.code == 101


@pytest.mark.gen_test(timeout=30)
async def test_live_connections_per_identity_are_capped(app_factory):
    app = await start(app_factory, auth__max_connections_per_identity=2)
    first = await ws_connect(app, token=VIEWER)
    await first.recv_type("welcome")
    sse = await sse_connect(app, token=VIEWER)
    await sse.next_type("welcome")
    with pytest.raises(HTTPClientError) as refused:
        await ws_connect(app, token=VIEWER)
    assert refused.value.code == 429
    extra = await raw_request(app, "GET", "/sse/admin/quotas", auth_headers("viewer"))
    assert extra.code == 429
    # Browser sessions of the same token are the same identity.
    jar = await browser_session(app, VIEWER)
    with pytest.raises(HTTPClientError) as refused:
        await ws_connect(app, token=None, headers=cookie_header(jar))
    assert refused.value.code == 429
    # Another identity is not affected; a freed slot can be used again.
    admin = await ws_connect(app, token=ADMIN)
    await admin.recv_type("welcome")
    first.close()
    for _ in range(50):
        if app.hub.count("websocket") == 1:
            break
        await asyncio.sleep(0.02)
    again = await ws_connect(app, token=VIEWER)
    await again.recv_type("welcome")


@pytest.mark.gen_test(timeout=30)
async def test_request_bodies_are_capped(app_factory):
    app = await start(app_factory, server__max_body_size=4096)
    body = json.dumps({"user": "bob", "command_type": "shell"})
    resp = await call(app, "POST", "/api/quotas/consume", raw=body + " " * 3000, token=SERVICE)
    assert resp.code == 200 and resp.json["periods"]["daily"]["used"] == 1
    # Over the cap: a JSON 413, nothing written.
    resp = await call(app, "POST", "/api/quotas/consume", raw=body + " " * 5000, token=SERVICE)
    assert resp.code == 413 and resp.json["error"]["code"] == "payload_too_large", resp
    # Far over it Tornado answers 400 from the Content-Length alone and closes the
    # connection: the body is never read and no handler runs.
    resp = await call(app, "POST", "/api/quotas/consume", raw=body + " " * 20000, token=SERVICE)
    assert resp.code == 400 and resp.body == b"", resp
    status = await call(app, "GET", "/api/quotas/users/bob", token=SERVICE)
    assert status.json["command_types"]["shell"]["daily"]["used"] == 1
    assert (await call(app, "GET", "/api/health", token=None)).code == 200


# -- dev endpoints -------------------------------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_dev_endpoints_do_not_exist_without_dev(app_factory):
    app = await app_factory()
    assert urls.DEV_ROUTES
    for pattern, _ in urls.DEV_ROUTES:
        for token in (ADMIN, None):
            resp = await call(app, "POST", sample_path(pattern), {}, token=token)
            assert resp.code == 404, (pattern, resp)
            assert resp.json["error"]["code"] == "not_found"


# -- sessions ------------------------------------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_session_cookie_flags_lifetime_and_token_leaving_the_address_bar(app_factory):
    app = await start(app_factory, auth__session_lifetime=3600.0, server__xheaders=True)
    resp, _ = await login_post(app, ADMIN)
    assert resp.code == 302
    assert resp.headers["Location"] == DEFAULT_NEXT  # the token leaves the address bar
    cookie = next(c for c in resp.headers.get_list("Set-Cookie") if c.startswith(SESSION_COOKIE))
    flags = [f.strip().lower() for f in cookie.split(";")]
    assert "httponly" in flags and "samesite=strict" in flags and "secure" not in flags
    expires = next(f for f in flags if f.startswith("expires="))
    left = time.mktime(time.strptime(expires[8:], "%a, %d %b %Y %H:%M:%S gmt")) - time.mktime(
        time.gmtime()
    )
    assert 3500 < left <= 3601
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["Referrer-Policy"] == "same-origin"
    # Behind a TLS proxy (server.xheaders) the cookie is Secure.
    headers = {"X-Forwarded-Proto": "https"}
    resp, _ = await login_post(app, ADMIN, headers=headers)
    cookie = next(c for c in resp.headers.get_list("Set-Cookie") if c.startswith(SESSION_COOKIE))
    assert "secure" in [f.strip().lower() for f in cookie.split(";")]
    # A service token cannot open a dashboard session.
    resp, _ = await login_post(app, SERVICE)
    assert resp.code == 401 and SESSION_COOKIE not in cookies_of(resp)


@pytest.mark.gen_test(timeout=30)
async def test_an_expired_session_is_refused_even_with_a_valid_signature(app_factory, tmp_path):
    app = await start(app_factory)
    jar = await browser_session(app, VIEWER)
    secret = app.web.settings["cookie_secret"]
    raw = tornado.web.decode_signed_value(secret, SESSION_COOKIE, jar[SESSION_COOKIE])
    payload = json.loads(raw)
    assert payload["e"] > time.time()
    for change in ({"e": int(time.time()) - 1}, {"r": "admin"}):
        value = json.dumps({**payload, **change})
        forged = tornado.web.create_signed_value(secret, SESSION_COOKIE, value)
        jar2 = {**jar, SESSION_COOKIE: forged.decode()}
        resp = await call(app, "GET", "/api/ws/health", token=None, headers=cookie_header(jar2))
        if "e" in change:
            assert resp.code == 401
        else:  # the role comes from the token, not from the cookie
            headers = cookie_header(jar2)
            resp = await call(app, "GET", "/api/admin/tokens", token=None, headers=headers)
            assert resp.code == 403


NASTY_NEXT = [
    "//evil.example",
    "///evil.example",
    "/\\evil.example",
    "\\\\evil.example",
    "https://evil.example/",
    "javascript:alert(1)",
    "/\t/evil.example",
    "/\n/evil.example",
    " //evil.example",
    "http:/\\/evil.example",
    "/%2F%2Fevil.example",
    "/€uro?x=ü",
]


@pytest.mark.gen_test(timeout=30)
async def test_login_next_is_never_an_open_redirect(app_factory):
    app = await start(app_factory)
    for nxt in NASTY_NEXT:
        resp, _ = await login_post(app, ADMIN, nxt)
        assert resp.code == 302, (nxt, resp)
        location = resp.headers["Location"]
        parts = urlsplit(location)
        assert location.startswith("/") and not location.startswith("//"), (nxt, location)
        assert not parts.scheme and not parts.netloc and "\\" not in location
        assert location.isascii()
    resp, _ = await login_post(app, ADMIN, "/api/plugins?a=1")
    assert resp.headers["Location"] == "/api/plugins?a=1"
    # The form carries next through a POST too.
    jar = await browser_session(app)
    form = f"token={quote(VIEWER)}&next={quote('//evil.example')}&_xsrf={jar['_xsrf']}"
    headers = {"Cookie": f"_xsrf={jar['_xsrf']}", "Content-Type": FORM}
    resp = await call(app, "POST", "/login", raw=form, token=None, headers=headers)
    assert resp.code == 302 and resp.headers["Location"] == DEFAULT_NEXT


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40) | st.from_regex(r"\A[/\\\t\n ]{0,4}[a-z.:/%€]{0,12}\Z"))
def test_safe_next_only_yields_same_site_paths(value):
    target = safe_next(value)
    # What a browser does to a Location: drop tabs/newlines, read "\" as "/".
    seen = re.sub(r"[\t\n\r]", "", target).replace("\\", "/").strip()
    parts = urlsplit(seen)
    assert target.isascii() and target.isprintable()
    assert seen.startswith("/") and not seen.startswith("//")
    assert not parts.scheme and not parts.netloc
    if re.fullmatch(r"/[A-Za-z0-9/_.?=&-]*", value) and not value.startswith("//"):
        assert target == value  # ordinary paths survive untouched


@pytest.mark.gen_test(timeout=30)
async def test_logout_closes_that_sessions_websocket_and_sse_with_1008(
    app_factory,
):
    app = await start(app_factory)
    jar = await browser_session(app, VIEWER)
    other = await browser_session(app, VIEWER)  # same token, another session
    headers = {**cookie_header(jar), "Origin": app.url}
    ws = await ws_connect(app, token=None, headers=headers)
    sse = await sse_connect(app, token=None, headers=cookie_header(jar))
    ws_other = await ws_connect(
        app, token=None, headers={**cookie_header(other), "Origin": app.url}
    )
    ws_bearer = await ws_connect(app, token=VIEWER)
    for client in (ws, ws_other, ws_bearer):
        await client.recv_type("welcome")
    await sse.next_type("welcome")

    # How fast this happens is measured by bench/close_latency.py, not asserted here.
    headers = {**cookie_header(jar), "Accept": "application/json"}
    resp = await call(app, "POST", "/logout", token=None, headers=headers)
    assert resp.code == 200 and resp.json == {"logged_out": True}
    assert await ws.closed(timeout=10) == 1008
    await asyncio.wait_for(sse.fetch, 10)
    assert sse.all[-1]["event"] == "close" and sse.all[-1]["message"]["data"]["code"] == 1008
    # Only that session: the other session and the bearer connection stay.
    for client in (ws_other, ws_bearer):
        await client.send({"type": "ping"})
        await client.recv_type("pong")
    # The cookie is dead for every route, even if replayed.
    replay = await call(app, "GET", "/api/ws/health", token=None, headers=cookie_header(jar))
    assert replay.code == 401
    with pytest.raises(HTTPClientError) as refused:
        await ws_connect(app, token=None, headers=headers)
    assert refused.value.code == 401


@pytest.mark.gen_test(timeout=30)
async def test_a_logged_out_session_stays_dead_after_a_restart(app_factory):
    app = await start(app_factory)
    jar = await browser_session(app, VIEWER)
    resp = await call(app, "POST", "/logout", token=None, headers=cookie_header(jar))
    assert resp.code == 302 and resp.headers["Location"] == "/login"
    await app.stop()
    app = await start(app_factory)
    resp = await call(app, "GET", "/api/ws/health", token=None, headers=cookie_header(jar))
    assert resp.code == 401
    fresh = await browser_session(app, VIEWER)
    resp = await call(app, "GET", "/api/ws/health", token=None, headers=cookie_header(fresh))
    assert resp.code == 200


@pytest.mark.gen_test(timeout=30)
async def test_sessions_logged_out_one_after_another_all_stay_dead(app_factory, tmp_path):
    app = await start(app_factory)
    jars = [await browser_session(app, VIEWER) for _ in range(3)]
    for jar in jars[:2]:
        resp = await call(app, "POST", "/logout", token=None, headers=cookie_header(jar))
        assert resp.code == 302
    codes = [
        (await call(app, "GET", "/api/ws/health", token=None, headers=cookie_header(j))).code
        for j in jars
    ]
    assert codes == [401, 401, 200]  # the third was never logged out
    ended = audit_rows(tmp_path, "session.end")
    token_id = next(t.token_id for t in app.auth.tokens() if t.name == "test-viewer")
    assert [(a, t, json.loads(d)) for a, t, d in ended] == [
        ("test-viewer", "test-viewer", {"token_id": token_id, "role": "viewer"})
    ] * 2


@pytest.mark.gen_test(timeout=30)
async def test_credentials_changed_by_another_process_hold_here_within_a_poll(
    app_factory, tmp_path
):
    """Another process (here: a second connection to the same SQLite file) revokes one token
    and stores a new one, bumping the credentials version as every security write does: this
    process reloads at its next poll, refuses the one, accepts the other and closes the
    revoked token's stream with 1008."""
    app = await start(app_factory, auth__sync_interval=0.1)
    made = await call(app, "POST", "/api/admin/tokens", {"name": "doomed", "role": "viewer"})
    doomed = made.json["token"]
    stream = await ws_connect(app, token=doomed)
    await stream.recv_type("welcome")
    newcomer = "qs_created-by-another-process-0123456789"
    digest = hashlib.sha256(newcomer.encode()).hexdigest()
    assert (await call(app, "GET", "/api/ws/health", token=newcomer)).code == 401
    with sqlite3.connect(f"{tmp_path}/quotaserver.db") as db:
        db.execute(
            "UPDATE api_token SET revoked_at = '2026-01-01 00:00:00', revoked_by = 'other' "
            "WHERE name = 'doomed'"
        )
        db.execute(
            "INSERT INTO api_token (digest, name, role, source, created_by, created_at) "
            "VALUES (?, 'newcomer', 'viewer', 'api', 'other', '2026-01-01 00:00:00')",
            (digest,),
        )
        db.execute("UPDATE auth_state SET version = version + 1")
    assert await stream.closed(timeout=10) == 1008
    assert (await call(app, "GET", "/api/ws/health", token=doomed)).code == 401
    assert (await call(app, "GET", "/api/ws/health", token=newcomer)).code == 200
    names = {t.name for t in app.auth.tokens()}
    assert "newcomer" in names and "doomed" not in names


@pytest.mark.gen_test(timeout=30)
async def test_security_writes_check_the_database_not_this_process_memory(app_factory, tmp_path):
    """Another process revoked an admin token, ended a session and created a token moments
    ago, and this process has not reloaded yet (a poll a minute away, no nudge): in memory
    all still look as before, but the writes they attempt are refused by the database."""
    app = await start(app_factory, auth__sync_interval=60)
    ops = (await call(app, "POST", "/api/admin/tokens", {"name": "ops", "role": "admin"})).json
    jar = await browser_session(app, ADMIN)
    signed = jar[SESSION_COOKIE].strip('"')
    raw = tornado.web.decode_signed_value(app.web.settings["cookie_secret"], SESSION_COOKIE, signed)
    session_id = json.loads(raw)["s"]
    with sqlite3.connect(f"{tmp_path}/quotaserver.db") as db:
        db.execute(
            "UPDATE api_token SET revoked_at = '2026-01-01 00:00:00', revoked_by = 'other' "
            "WHERE name = 'ops'"
        )
        db.execute(
            "INSERT INTO revoked_session (session_id, expires_at) VALUES (?, '2999-01-01')",
            (session_id,),
        )
        db.execute(
            "INSERT INTO api_token (digest, name, role, source, created_by, created_at) "
            "VALUES (?, 'taken', 'viewer', 'api', 'other', '2026-01-01 00:00:00')",
            ("ab" * 32,),
        )
    assert (await call(app, "GET", "/api/ws/health", token=ops["token"])).code == 200
    body = {"name": "made-by-ops", "role": "viewer"}
    refused = await call(app, "POST", "/api/admin/tokens", body, token=ops["token"])
    assert (refused.code, refused.json["error"]) == (
        401, {"code": "unauthorized", "message": "these credentials were revoked"},
    )  # fmt: skip
    body = {"name": "made-by-session", "role": "viewer"}
    refused = await call(
        app, "POST", "/api/admin/tokens", body, token=None, headers=cookie_header(jar)
    )
    assert refused.code == 401, refused
    clash = await call(app, "POST", "/api/admin/tokens", {"name": "taken", "role": "viewer"})
    assert (clash.code, clash.json["error"]) == (
        409, {"code": "conflict", "message": "an active token already has this name"},
    )  # fmt: skip
    # The admin token of the configuration, untouched, still writes.
    made = await call(app, "POST", "/api/admin/tokens", {"name": "fine", "role": "viewer"})
    assert made.code == 201
    listed = (await call(app, "GET", "/api/admin/tokens")).json["tokens"]
    assert {"made-by-ops", "made-by-session"}.isdisjoint(t["name"] for t in listed)
    # Nor may the revoked token revoke anything.
    fine = next(t["token_id"] for t in listed if t["name"] == "fine")
    refused = await call(app, "DELETE", f"/api/admin/tokens/{fine}", token=ops["token"])
    assert refused.code == 401
    assert (await call(app, "GET", "/api/ws/health", token=made.json["token"])).code == 200


# -- token revocation ----------------------------------------------------------------------
def audit_rows(tmp_path: Any, action: str) -> list[tuple]:
    with sqlite3.connect(f"{tmp_path}/quotaserver.db") as db:
        query = "SELECT actor, target, details FROM audit_log WHERE action = ? ORDER BY id"
        return db.execute(query, (action,)).fetchall()


@pytest.mark.gen_test(timeout=30)
async def test_a_token_write_on_a_locked_database_is_503_and_writes_nothing(app_factory, tmp_path):
    app = await start(app_factory, database__busy_timeout=0.2)
    holder = sqlite3.connect(f"{tmp_path}/quotaserver.db", isolation_level=None, timeout=0)
    holder.execute("BEGIN IMMEDIATE")  # another process's write lock
    try:
        made = await call(app, "POST", "/api/admin/tokens", {"name": "later", "role": "viewer"})
    finally:
        holder.rollback()
        holder.close()
    assert made.code == 503, made
    assert made.headers["Retry-After"] == "1"  # as a consume's: the lock is brief
    assert made.json["error"]["code"] == "database_busy"
    # Nothing was half-written: the same name can be created now.
    again = await call(app, "POST", "/api/admin/tokens", {"name": "later", "role": "viewer"})
    assert again.code == 201 and "Retry-After" not in again.headers


@pytest.mark.gen_test(timeout=30)
async def test_a_token_write_the_database_refuses_is_503_and_changes_nothing(
    app_factory, tmp_path, caplog
):
    """Not a lock but a refusal (here a trigger a DBA left on the table): 503 with
    Retry-After, the reason in the log, and nothing changed, in memory or in the rows."""
    app = await start(app_factory)
    with sqlite3.connect(f"{tmp_path}/quotaserver.db") as db:
        db.execute(
            "CREATE TRIGGER no_tokens BEFORE INSERT ON api_token "
            "BEGIN SELECT RAISE(ABORT, 'tokens are frozen'); END"
        )
    with caplog.at_level("WARNING", logger="quotaserver.tokens"):
        made = await call(app, "POST", "/api/admin/tokens", {"name": "frozen", "role": "viewer"})
    assert made.code == 503 and made.headers["Retry-After"] == "5", made
    assert made.json["error"] == {
        "code": "unavailable",
        "message": "the database did not accept the change; nothing was changed, retry later",
    }
    assert any(
        r.getMessage() == "security change not written: tokens are frozen" for r in caplog.records
    )
    listed = (await call(app, "GET", "/api/admin/tokens")).json["tokens"]
    assert "frozen" not in {t["name"] for t in listed}
    with sqlite3.connect(f"{tmp_path}/quotaserver.db") as db:
        db.execute("DROP TRIGGER no_tokens")
    made = await call(app, "POST", "/api/admin/tokens", {"name": "frozen", "role": "viewer"})
    assert made.code == 201 and "Retry-After" not in made.headers


@pytest.mark.gen_test(timeout=30)
async def test_a_created_token_is_listed_as_created_and_its_name_is_taken(app_factory):
    app = await start(app_factory)
    made = await call(app, "POST", "/api/admin/tokens", {"name": "ci-bot", "role": "service"})
    assert made.code == 201
    assert (made.json["name"], made.json["role"], made.json["source"]) == (
        "ci-bot",
        "service",
        "api",
    )
    secret = made.json["token"]
    assert secret.startswith("qs_") and len(secret) == 3 + 43  # 32 random bytes, base64url
    listed = (await call(app, "GET", "/api/admin/tokens")).json["tokens"]
    (row,) = [t for t in listed if t["name"] == "ci-bot"]
    assert (row["role"], row["source"], row["created_by"]) == ("service", "api", "test-admin")
    assert row["created_at"] and not row["revoked"]
    again = await call(app, "POST", "/api/admin/tokens", {"name": "ci-bot", "role": "viewer"})
    assert (again.code, again.json["error"]) == (
        409, {"code": "conflict", "message": "an active token already has this name"},
    )  # fmt: skip
    assert "Retry-After" not in again.headers  # only a 503 says when to retry


@pytest.mark.gen_test(timeout=30)
async def test_bad_token_requests_name_the_rule_they_broke(app_factory):
    app = await start(app_factory)
    bad_role = await call(app, "POST", "/api/admin/tokens", {"name": "x", "role": "root"})
    assert (bad_role.code, bad_role.json["error"]) == (
        400, {"code": "invalid_field", "message": "role must be one of " + ", ".join(ROLES)},
    )  # fmt: skip
    bad_name = await call(app, "POST", "/api/admin/tokens", {"name": "a b", "role": "viewer"})
    rule = "name must be 1-64 letters, digits or . _ @ - (starting with a letter or digit)"
    assert (bad_name.code, bad_name.json["error"]) == (
        400, {"code": "invalid_field", "message": rule},
    )  # fmt: skip
    made = await call(app, "POST", "/api/admin/tokens", {"name": "ok", "role": "viewer"})
    assert made.json["created_at"].endswith("Z") and made.json["created_by"] == "test-admin"


@pytest.mark.gen_test(timeout=30)
async def test_a_revocation_ends_that_token_only_and_says_what_it_did(app_factory, tmp_path):
    clock = FakeClock()
    app = await start(app_factory, clock=clock)
    unknown = await call(app, "DELETE", "/api/admin/tokens/0123456789abcdef")
    assert (unknown.code, unknown.json["error"]) == (
        404, {"code": "unknown_token", "message": "no active token has this id"},
    )  # fmt: skip
    made = {
        name: (await call(app, "POST", "/api/admin/tokens", {"name": name, "role": "viewer"})).json
        for name in ("temp", "stays")
    }
    token_id = made["temp"]["token_id"]
    assert (await call(app, "DELETE", f"/api/admin/tokens/{token_id}")).code == 200
    assert (await call(app, "GET", "/api/ws/health", token=made["temp"]["token"])).code == 401
    assert (await call(app, "GET", "/api/ws/health", token=made["stays"]["token"])).code == 200
    assert (await call(app, "GET", "/api/ws/health", token=VIEWER)).code == 200
    again = await call(app, "DELETE", f"/api/admin/tokens/{token_id}")  # a retry
    when = clock().isoformat(timespec="milliseconds").replace("+00:00", "Z")
    assert (again.code, again.json["error"]) == (
        404,
        {"code": "unknown_token",
         "message": f"this token was already revoked by test-admin at {when}"},
    )  # fmt: skip
    # A token of the configuration is remembered as revoked, with its source.
    listed = (await call(app, "GET", "/api/admin/tokens")).json["tokens"]
    config_viewer = next(t for t in listed if t["name"] == "test-viewer")
    assert (await call(app, "DELETE", f"/api/admin/tokens/{config_viewer['token_id']}")).code == 200
    listed = (await call(app, "GET", "/api/admin/tokens")).json["tokens"]
    gone = {t["name"]: (t["source"], t["revoked_by"]) for t in listed if t["revoked"]}
    assert gone == {"temp": ("api", "test-admin"), "test-viewer": ("config", "test-admin")}
    details = [json.loads(d) for _a, _t, d in audit_rows(tmp_path, "token.revoke")]
    assert details == [
        {"token_id": token_id, "role": "viewer", "source": "api"},
        {"token_id": config_viewer["token_id"], "role": "viewer", "source": "config"},
    ]


@pytest.mark.gen_test(timeout=30)
async def test_revoking_a_token_closes_its_connections_with_1008_and_is_audited(
    app_factory, tmp_path
):
    app = await start(app_factory)
    created = await call(app, "POST", "/api/admin/tokens", {"name": "wallboard", "role": "viewer"})
    assert created.code == 201, created
    token, token_id = created.json["token"], created.json["token_id"]
    assert created.json["created_by"] == "test-admin"
    ws = await ws_connect(app, token=token)
    sse = await sse_connect(app, token=token)
    jar = await browser_session(app, token)
    ws_session = await ws_connect(
        app, token=None, headers={**cookie_header(jar), "Origin": app.url}
    )
    bystander = await ws_connect(app, token=VIEWER)
    for client in (ws, ws_session, bystander):
        await client.recv_type("welcome")
    await sse.next_type("welcome")

    resp = await call(app, "DELETE", f"/api/admin/tokens/{token_id}")
    assert resp.code == 200, resp
    assert resp.json["connections_closed"] == 3
    assert await ws.closed(timeout=10) == 1008
    assert await ws_session.closed(timeout=10) == 1008
    await asyncio.wait_for(sse.fetch, 10)
    assert sse.all[-1]["message"]["data"] == {"code": 1008, "reason": "credentials revoked"}
    await bystander.send({"type": "ping"})
    await bystander.recv_type("pong")
    # The token and its sessions are refused everywhere.
    assert (await call(app, "GET", "/api/ws/health", token=token)).code == 401
    replay = await call(app, "GET", "/api/ws/health", token=None, headers=cookie_header(jar))
    assert replay.code == 401
    assert (await call(app, "DELETE", f"/api/admin/tokens/{token_id}")).code == 404
    # Audited: who created it, who revoked it.
    assert [r[:2] for r in audit_rows(tmp_path, "token.create")] == [("test-admin", "wallboard")]
    revoked = audit_rows(tmp_path, "token.revoke")
    assert [r[:2] for r in revoked] == [("test-admin", "wallboard")]
    assert json.loads(revoked[0][2])["token_id"] == token_id
    listed = {
        t["token_id"]: t for t in (await call(app, "GET", "/api/admin/tokens")).json["tokens"]
    }
    assert listed[token_id]["revoked"] is True and listed[token_id]["revoked_by"] == "test-admin"
    assert all("token" not in t and "digest" not in t for t in listed.values())
    # Only digests are stored.
    with sqlite3.connect(f"{tmp_path}/quotaserver.db") as db:
        dump = "\n".join(db.iterdump())
    assert token not in dump and ADMIN not in dump


@pytest.mark.gen_test(timeout=30)
async def test_revoking_a_configured_token_lasts_across_restarts(app_factory, tmp_path):
    app = await start(app_factory)
    tokens = (await call(app, "GET", "/api/admin/tokens")).json["tokens"]
    viewer = next(t for t in tokens if t["name"] == "test-viewer")
    assert viewer["source"] == "config"
    jar = await browser_session(app)  # an admin acting from the dashboard: XSRF applies
    path = f"/api/admin/tokens/{viewer['token_id']}"
    resp = await call(app, "DELETE", path, token=None, headers=cookie_header(jar, xsrf=False))
    assert resp.code == 403
    resp = await call(app, "DELETE", path, token=None, headers=cookie_header(jar))
    assert resp.code == 200
    assert (await call(app, "GET", "/api/ws/health", token=VIEWER)).code == 401
    await app.stop()
    app = await start(app_factory)  # the config still lists the token
    assert (await call(app, "GET", "/api/ws/health", token=VIEWER)).code == 401
    assert (await call(app, "GET", "/api/ws/health", token=ADMIN)).code == 200
    # The last admin token cannot be revoked (nobody could administer the server).
    admin_id = next(
        t["token_id"]
        for t in (await call(app, "GET", "/api/admin/tokens")).json["tokens"]
        if t["name"] == "test-admin"
    )
    resp = await call(app, "DELETE", f"/api/admin/tokens/{admin_id}")
    assert resp.code == 409 and resp.json["error"]["code"] == "last_admin"


@pytest.mark.gen_test(timeout=30)
async def test_the_last_admin_rule_counts_live_admin_tokens_only(app_factory):
    """Who keeps the server administrable: a live admin token, declared or created; not a
    viewer token, not a revoked admin token."""
    app = await start(app_factory)

    async def revoke(name: str, token: str = ADMIN) -> Any:
        listed = (await call(app, "GET", "/api/admin/tokens")).json["tokens"]
        token_id = next(t["token_id"] for t in listed if t["name"] == name and not t["revoked"])
        return await call(app, "DELETE", f"/api/admin/tokens/{token_id}", token=token)

    for name, role in (("ops-viewer", "viewer"), ("ops-admin", "admin")):
        made = await call(app, "POST", "/api/admin/tokens", {"name": name, "role": role})
        assert made.code == 201
    # The declared test-admin stays: revoking the created admin is allowed.
    assert (await revoke("ops-admin")).code == 200
    # Now test-admin is the only live admin: a viewer token and a revoked admin do not count.
    refused = await revoke("test-admin")
    assert refused.code == 409, refused
    assert refused.json["error"] == {
        "code": "last_admin",
        "message": "the last admin token cannot be revoked",
    }
    assert (await call(app, "GET", "/api/ws/health", token=ADMIN)).code == 200
    # The revoked one is listed as such, with who and when.
    listed = (await call(app, "GET", "/api/admin/tokens")).json["tokens"]
    (gone,) = [t for t in listed if t["name"] == "ops-admin"]
    assert gone.keys() == {
        "token_id", "name", "role", "source", "created_by", "created_at",
        "revoked", "revoked_by", "revoked_at",
    }  # fmt: skip
    assert (gone["role"], gone["source"], gone["revoked"]) == ("admin", "api", True)
    assert gone["created_by"] == gone["revoked_by"] == "test-admin"
    assert gone["created_at"] <= gone["revoked_at"]


@pytest.mark.gen_test(timeout=30)
async def test_a_created_admin_token_can_replace_the_declared_one(app_factory):
    """The rule counts live API admin tokens as admins, and a declared admin token that was
    revoked as not one: the created admin may take over, then is the last."""
    app = await start(app_factory)

    async def revoke(name: str, token: str) -> Any:
        listed = (await call(app, "GET", "/api/admin/tokens", token=token)).json["tokens"]
        token_id = next(t["token_id"] for t in listed if t["name"] == name and not t["revoked"])
        return await call(app, "DELETE", f"/api/admin/tokens/{token_id}", token=token)

    made = await call(app, "POST", "/api/admin/tokens", {"name": "ops-admin", "role": "admin"})
    assert made.code == 201
    ops = made.json["token"]
    assert (await revoke("test-admin", ops)).code == 200  # ops-admin keeps it administrable
    assert (await call(app, "GET", "/api/ws/health", token=ADMIN)).code == 401
    refused = await revoke("ops-admin", ops)  # the revoked declared admin does not count
    assert refused.code == 409 and refused.json["error"]["code"] == "last_admin", refused
    assert (await call(app, "GET", "/api/ws/health", token=ops)).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_revoked_tokens_are_listed_after_the_active_ones_newest_first(app_factory):
    clock = FakeClock()
    app = await start(app_factory, clock=clock)
    for name in ("first-gone", "second-gone", "kept"):
        made = await call(app, "POST", "/api/admin/tokens", {"name": name, "role": "viewer"})
        assert made.code == 201
    for name in ("first-gone", "second-gone"):
        clock.advance(minutes=1)
        listed = (await call(app, "GET", "/api/admin/tokens")).json["tokens"]
        token_id = next(t["token_id"] for t in listed if t["name"] == name)
        assert (await call(app, "DELETE", f"/api/admin/tokens/{token_id}")).code == 200
    listed = (await call(app, "GET", "/api/admin/tokens")).json["tokens"]
    revoked = [t["name"] for t in listed if t["revoked"]]
    active = [t["name"] for t in listed if not t["revoked"]]
    assert revoked == ["second-gone", "first-gone"]
    assert "kept" in active and "first-gone" not in active
    assert [t["revoked"] for t in listed] == sorted(t["revoked"] for t in listed)


@pytest.mark.gen_test(timeout=30)
async def test_a_runtime_token_works_in_this_process_with_its_role(app_factory):
    """The demo traffic's token: registered in memory, not stored."""
    app = await start(app_factory)
    with pytest.raises(ValueError):
        app.auth.add_token("qs_x", "demo", "root")
    app.auth.add_token("qs_demo-secret", "demo", "service")
    assert (await consume(app, "alice", token="qs_demo-secret")).code == 200
    assert (await call(app, "GET", "/api/ws/health", token="qs_demo-secret")).code == 403
    (info,) = [t for t in app.auth.tokens() if t.name == "demo"]
    assert (info.role, info.source) == ("service", "runtime")


@pytest.mark.gen_test(timeout=30)
async def test_token_creation_validates_and_new_tokens_work_at_once(app_factory):
    app = await start(app_factory)
    for body, status in (
        ({"name": "x", "role": "root"}, 400),
        ({"name": "", "role": "viewer"}, 400),
        ({"name": "a b", "role": "viewer"}, 400),
        ({"name": "x" * 65, "role": "viewer"}, 400),
        ({"name": "x", "role": "viewer", "token": "chosen"}, 400),
        ({"name": "test-viewer", "role": "viewer"}, 409),
    ):
        resp = await call(app, "POST", "/api/admin/tokens", body)
        assert resp.code == status, (body, resp)
    body = {"name": "n", "role": "viewer"}
    assert (await call(app, "POST", "/api/admin/tokens", body, token=VIEWER)).code == 403
    made = await call(app, "POST", "/api/admin/tokens", {"name": "batch-job", "role": "service"})
    assert made.code == 201
    assert (await consume(app, "alice", token=made.json["token"])).code == 200
    assert (await call(app, "GET", "/api/ws/health", token=made.json["token"])).code == 403
    await app.stop()
    app = await start(app_factory)  # stored: still valid after a restart
    assert (await consume(app, "alice", token=made.json["token"])).code == 200


# -- headers -------------------------------------------------------------------------------
@pytest.mark.gen_test(timeout=30)
async def test_security_headers_everywhere_and_no_server_banner(app_factory):
    app = await start(app_factory)
    for path, token in (
        ("/api/health", None),
        ("/login", None),
        ("/api/ws/health", None),
        ("/no/such/route", ADMIN),
        ("/static/css/login.css", None),
    ):
        resp = await call(app, "GET", path, token=token)
        assert "Server" not in resp.headers, path
        csp = resp.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Referrer-Policy"] == "same-origin"
    headers = {**WS_UPGRADE, **auth_headers("admin")}
    head = await raw_request(app, "GET", "/ws/admin/quotas", headers)
    assert head.code == 101 and "Server" not in head.headers


# -- first run: the real process ------------------------------------------------------------
async def _run_server(
    tmp_path: Any, env_extra: dict[str, str] | None = None, login_url: bool = True
) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTASERVER_")}
    env.update(env_extra or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, os.path.join(ROOT, "run.py"), "--port", "0",
        cwd=str(tmp_path), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    proc.lines = []
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line, "".join(proc.lines) + (await proc.stderr.read()).decode()
        proc.lines.append(line)
        if "/login#code=" in line if login_url else "dashboard:" in line:
            break
    proc.url = re.search(r"http://127\.0\.0\.1:\d+", "".join(proc.lines)).group(0)
    proc.port = int(proc.url.rsplit(":", 1)[1])
    return proc


async def _stop(proc: Any) -> str:
    proc.send_signal(2)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    return (await proc.stderr.read()).decode()


@pytest.mark.gen_test(timeout=60)
async def test_first_run_token_file_is_0600_and_the_printed_url_logs_in(tmp_path):
    proc = await _run_server(tmp_path)
    try:
        login_url = re.search(r"http://\S+/login#code=\S+", "".join(proc.lines)).group(0)
        code = login_url.split("code=", 1)[1]
        path = tmp_path / "data" / "admin_token"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        token = path.read_text().strip()
        assert token not in "".join(proc.lines)
        assert stat.S_IMODE(os.stat(tmp_path / "data" / "cookie_secret").st_mode) == 0o600
        # A fresh browser: the dashboard sends it to the login page.
        resp = await call(proc, "GET", "/admin/quotas", token=None)
        assert resp.code == 302 and resp.headers["Location"].startswith("/login?next=")
        assert (await call(proc, "GET", resp.headers["Location"], token=None)).code == 200
        assert (await call(proc, "GET", "/api/ws/health", token=None)).code == 401
        # Opening the printed link: the page POSTs the one-time code from the fragment.
        form = await call(proc, "GET", "/login", token=None)
        xsrf = cookies_of(form)["_xsrf"]
        hdrs = {"Cookie": f"_xsrf={xsrf}", "Content-Type": FORM}
        body = f"code={code}&_xsrf={xsrf}"
        resp = await call(proc, "POST", "/login", raw=body, token=None, headers=hdrs)
        assert resp.code == 302 and "code" not in resp.headers["Location"]
        jar = cookies_of(resp)
        headers = {"Cookie": f"{SESSION_COOKIE}={jar[SESSION_COOKIE]}"}
        page = await call(proc, "GET", resp.headers["Location"], token=None, headers=headers)
        assert page.code == 200 and b"<html" in page.body.lower()
        assert (await call(proc, "GET", "/api/ws/health", token=None, headers=headers)).code == 200
    finally:
        logs = await _stop(proc)
    assert "401 GET /api/ws/health" in logs  # the access log went to stderr
    assert token not in logs
    # A second start reuses the same token and prints a new one-time link.
    proc = await _run_server(tmp_path)
    try:
        assert f"/login#code={code}" not in "".join(proc.lines)
        assert (tmp_path / "data" / "admin_token").read_text().strip() == token
    finally:
        await _stop(proc)


@pytest.mark.gen_test(timeout=60)
async def test_auth_disabled_logs_a_loud_warning(tmp_path):
    proc = await _run_server(tmp_path, {"QUOTASERVER_AUTH_ENABLED": "false"}, login_url=False)
    try:
        assert (await call(proc, "GET", "/api/ws/health", token=None)).code == 200
        assert not (tmp_path / "data" / "admin_token").exists()
    finally:
        logs = await _stop(proc)
    assert "AUTHENTICATION IS DISABLED" in logs


@pytest.mark.gen_test(timeout=30)
async def test_foreign_pages_cannot_post_without_a_token_even_with_auth_disabled(app_factory):
    app = await app_factory(auth__enabled=False)
    await consume(app, "vic", token=None)
    path = "/api/admin/quotas/users/vic/reset"
    foreign = {"Origin": "https://evil.example", "Content-Type": "text/plain"}
    resp = await call(app, "POST", path, raw=b"", token=None, headers=foreign)
    assert resp.code == 403 and resp.json["error"]["code"] == "forbidden_origin"
    status = await call(app, "GET", "/api/quotas/users/vic", token=None)
    assert status.json["command_types"]["shell"]["daily"]["used"] == 1
    # Scripts without an Origin (curl) and the server's own pages still work.
    own = {"Origin": app.url}
    assert (await call(app, "POST", path, {}, token=None, headers=own)).code == 200
    assert (await consume(app, "vic", token=None)).code == 200
