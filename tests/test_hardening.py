"""Issue 12: each finding of the pen test, replayed against the real server.

Real app over real sockets on a real SQLite file; the locked database is a second SQLite
connection holding ``BEGIN EXCLUSIVE`` on the same file, exactly as another process would.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import sqlite3
import stat
import subprocess
import sys
import time
from typing import Any
from urllib.parse import quote

import pytest
from clients import (
    ADMIN,
    FORM,
    SERVICE,
    VIEWER,
    call,
    consume,
    cookies_of,
    login,
    session_headers,
    sse_connect,
    ws_connect,
)
from tornado.httpclient import HTTPClientError

from quotaserver.auth import SESSION_COOKIE
from quotaserver.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
API = "/api/admin/quotas"


def set_cookie_flags(resp: Any, name: str) -> list[str]:
    header = next(c for c in resp.headers.get_list("Set-Cookie") if c.startswith(name + "="))
    return [f.strip().lower() for f in header.split(";")[1:]]


def audit(tmp_path: Any, action: str) -> list[tuple]:
    with sqlite3.connect(f"{tmp_path}/quotaserver.db") as db:
        query = "SELECT actor, target, details FROM audit_log WHERE action = ? ORDER BY id"
        return db.execute(query, (action,)).fetchall()


class Lock:
    """Another connection holding the write lock of the app's SQLite file."""

    def __init__(self, tmp_path: Any):
        self.db = sqlite3.connect(f"{tmp_path}/quotaserver.db", isolation_level=None)
        self.db.execute("BEGIN EXCLUSIVE")

    def release(self) -> None:
        self.db.execute("ROLLBACK")
        self.db.close()


def assert_unavailable(resp: Any) -> None:
    assert resp.code == 503, resp
    # A locked SQLite file: the store says so (a driver error would be "unavailable").
    assert resp.json["error"]["code"] == "database_busy"
    assert resp.headers["Retry-After"]


# -- 1. all-or-nothing security state -----------------------------------------------------
@pytest.mark.gen_test(timeout=90)
async def test_revocation_under_a_locked_database_changes_nothing_then_applies_whole(
    app_factory, tmp_path
):
    app = await app_factory()
    made = await call(app, "POST", "/api/admin/tokens", {"name": "wallboard", "role": "viewer"})
    token, token_id = made.json["token"], made.json["token_id"]
    ws = await ws_connect(app, token=token)
    await ws.recv_type("welcome")
    sse = await sse_connect(app, token=token)
    await sse.next_type("welcome")

    lock = Lock(tmp_path)
    try:
        assert_unavailable(await call(app, "DELETE", f"/api/admin/tokens/{token_id}"))
        # Nothing changed: the token works, its streams are open, no audit row was written.
        assert (await call(app, "GET", "/api/ws/health", token=token)).code == 200
        await ws.send({"type": "ping"})
        await ws.recv_type("pong")
        assert not sse.fetch.done()
        rows = lock.db.execute("SELECT count(*) FROM audit_log WHERE action = 'token.revoke'")
        assert rows.fetchone()[0] == 0
        # Creating a token under the lock: 503, and the name stays free.
        body = {"name": "ci", "role": "service"}
        assert_unavailable(await call(app, "POST", "/api/admin/tokens", body))
    finally:
        lock.release()

    # The retry meets the real state (still active), and now applies whole.
    resp = await call(app, "DELETE", f"/api/admin/tokens/{token_id}")
    assert resp.code == 200 and resp.json["connections_closed"] == 2, resp
    assert await ws.closed(timeout=5) == 1008
    await sse.fetch
    assert sse.all[-1]["message"]["data"] == {"code": 1008, "reason": "credentials revoked"}
    assert (await call(app, "GET", "/api/ws/health", token=token)).code == 401
    retry = await call(app, "DELETE", f"/api/admin/tokens/{token_id}")
    assert retry.code == 404 and "already revoked by test-admin" in retry.json["error"]["message"]
    assert [r[:2] for r in audit(tmp_path, "token.revoke")] == [("test-admin", "wallboard")]
    assert (await call(app, "POST", "/api/admin/tokens", body)).code == 201
    await app.stop()
    app = await app_factory()
    assert (await call(app, "GET", "/api/ws/health", token=token)).code == 401


@pytest.mark.gen_test(timeout=90)
async def test_logout_under_a_locked_database_changes_nothing_then_applies_whole(
    app_factory, tmp_path
):
    app = await app_factory()
    headers = await session_headers(app, VIEWER)
    ws = await ws_connect(app, token=None, headers={**headers, "Origin": app.url})
    await ws.recv_type("welcome")
    logout = {**headers, "Accept": "application/json"}

    lock = Lock(tmp_path)
    try:
        assert_unavailable(await call(app, "POST", "/logout", token=None, headers=logout))
        assert (await call(app, "GET", "/api/ws/health", token=None, headers=headers)).code == 200
        await ws.send({"type": "ping"})
        await ws.recv_type("pong")
    finally:
        lock.release()

    resp = await call(app, "POST", "/logout", token=None, headers=logout)
    assert resp.code == 200 and resp.json == {"logged_out": True}
    assert await ws.closed(timeout=5) == 1008
    assert (await call(app, "GET", "/api/ws/health", token=None, headers=headers)).code == 401
    ended = audit(tmp_path, "session.end")
    assert [r[:2] for r in ended] == [("test-viewer", "test-viewer")]
    assert "session" not in json.loads(ended[0][2]).get("token", "")
    await app.stop()
    app = await app_factory()
    assert (await call(app, "GET", "/api/ws/health", token=None, headers=headers)).code == 401


# -- 2. no credential in a URL ------------------------------------------------------------
@pytest.mark.gen_test(timeout=60)
async def test_login_by_url_makes_no_session_and_codes_work_once_then_expire(app_factory):
    app = await app_factory(auth__tokens=[])  # no admin configured: the first-run token
    assert app.auth.first_run_token
    code = await app.auth.issue_login_code()
    for query in (f"token={quote(app.auth.first_run_token)}", f"code={code}"):
        resp = await call(app, "GET", f"/login?{query}", token=None)
        assert resp.code == 200 and SESSION_COOKIE not in cookies_of(resp), query

    resp, _ = await login(app, "code", code)  # the code survived the GETs: never redeemed
    assert resp.code == 302 and SESSION_COOKIE in cookies_of(resp)
    again, _ = await login(app, "code", code)
    assert again.code == 401 and SESSION_COOKIE not in cookies_of(again)

    # A code expires: the login codes run on an injectable wall clock.
    now = [time.time()]
    app.auth.login_codes.clock = lambda: now[0]
    late = await app.auth.issue_login_code()
    now[0] += app.config["auth.login_code_lifetime"] + 1
    resp, _ = await login(app, "code", late)
    assert resp.code == 401 and SESSION_COOKIE not in cookies_of(resp)


@pytest.mark.gen_test(timeout=60)
async def test_a_foreign_origin_login_is_refused(app_factory):
    app = await app_factory()
    for headers in ({"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"}):
        resp, _ = await login(app, "token", VIEWER, headers)
        assert resp.code == 403 and resp.json["error"]["code"] == "forbidden_origin", headers
        assert SESSION_COOKIE not in cookies_of(resp)
    resp, _ = await login(app, "token", VIEWER, {"Origin": app.url})
    assert resp.code == 302 and SESSION_COOKIE in cookies_of(resp)


# -- 4. host validation --------------------------------------------------------------------
@pytest.mark.gen_test(timeout=60)
async def test_a_rebound_host_is_refused_before_any_handler(app_factory):
    app = await app_factory(auth__enabled=False)
    rebound = {"Host": "rebind.test", "Origin": "http://rebind.test"}
    body = {"limits": {"daily": 1}}
    resp = await call(app, "PUT", f"{API}/rules/shell", body, token=None, headers=rebound)
    assert resp.code == 421 and resp.json["error"]["code"] == "misdirected_request"
    made = await call(
        app, "POST", "/api/admin/tokens", {"name": "x", "role": "admin"}, None, rebound
    )
    assert made.code == 421 and "token" not in made.json
    assert (await call(app, "GET", "/api/health", token=None, headers=rebound)).code == 421
    with pytest.raises(HTTPClientError) as refused:
        await ws_connect(app, token=None, headers=rebound)
    assert refused.value.code == 421
    rules = (await call(app, "GET", f"{API}/rules", token=None)).json
    assert rules["defaults"]["shell"]["daily"] == 500, rules
    listed = (await call(app, "GET", "/api/admin/tokens", token=None)).json["tokens"]
    assert [t for t in listed if t["name"] == "x"] == []
    # Loopback names are the server's own.
    for host in ("localhost", f"localhost:{app.port}", "127.0.0.1", "[::1]:8888"):
        resp = await call(app, "GET", "/api/health", token=None, headers={"Host": host})
        assert resp.code == 200, host


@pytest.mark.gen_test(timeout=60)
async def test_public_origins_name_the_hosts_and_origins_served(app_factory):
    app = await app_factory(server__public_origins=["https://quotas.example.com"])
    ok = {"Host": "quotas.example.com"}
    assert (await call(app, "GET", "/api/ws/health", token=VIEWER, headers=ok)).code == 200
    other = {"Host": "rebind.test"}
    assert (await call(app, "GET", "/api/ws/health", token=VIEWER, headers=other)).code == 421
    # The public origin is an accepted Origin for the live streams behind a proxy.
    ws = await ws_connect(app, token=VIEWER, headers={"Origin": "https://quotas.example.com"})
    await ws.recv_type("welcome")
    ws.close()


def test_auth_disabled_on_a_network_address_needs_an_explicit_flag():
    env = {"QUOTASERVER_AUTH_ENABLED": "false"}
    with pytest.raises(ConfigError, match="auth.allow_disabled_on_network"):
        load_config(env=env, overrides={"server.host": "0.0.0.0"})
    load_config(env=env, overrides={"server.host": "127.0.0.1"})
    flagged = {**env, "QUOTASERVER_AUTH_ALLOW_DISABLED_ON_NETWORK": "true"}
    assert not load_config(env=flagged, overrides={"server.host": "0.0.0.0"})["auth.enabled"]


# -- 5. names ------------------------------------------------------------------------------
HIDDEN = ["x\u202eevil\u200b", "a\u200db", "\u2066bob\u2069", "al\u00adice", "x\ufeff", "\u3164"]


@pytest.mark.gen_test(timeout=60)
async def test_names_with_invisible_or_bidi_characters_are_refused(app_factory, tmp_path):
    app = await app_factory()
    for name in HIDDEN:
        resp = await consume(app, name)
        assert resp.code == 400 and resp.json["error"]["code"] == "invalid_field", name
        path = f"{API}/users/{quote(name)}/limits/shell"
        resp = await call(app, "PUT", path, {"limits": {"daily": 1}})
        assert resp.code == 400 and resp.json["error"]["code"] == "invalid_field", name
    resp = await consume(app, "alice", command_type="shell\u200b")
    assert resp.code == 400 and resp.json["error"]["code"] == "invalid_field"
    bidi_type = quote("sh\u202eell")
    resp = await call(app, "PUT", f"{API}/rules/{bidi_type}", {"limits": {"daily": 1}})
    assert resp.code == 400 and resp.json["error"]["code"] == "invalid_field"
    # Names in other scripts are still names.
    for name in ("zoë", "Jürgen O'Neil", "δοκιμή", "用户"):
        assert (await consume(app, name)).code == 200, name
    with sqlite3.connect(f"{tmp_path}/quotaserver.db") as db:
        stored = [row[0] for row in db.execute("SELECT username FROM user")]
    assert not set(stored) & set(HIDDEN)
    with pytest.raises(ConfigError, match="quotas.command_types"):
        load_config(env={"QUOTASERVER_QUOTAS_COMMAND_TYPES": "[shell, 'co\u200bde']"})


# -- 6. secrets at rest --------------------------------------------------------------------
@pytest.mark.gen_test(timeout=60)
async def test_secret_and_database_files_are_created_owner_only(app_factory, tmp_path):
    previous = os.umask(0o022)  # a usual umask: the server must not depend on it
    try:
        app = await app_factory(auth__tokens=[])
        await consume(app, "alice", token=app.auth.first_run_token)
    finally:
        os.umask(previous)
    files = ["admin_token", "cookie_secret", "quotaserver.db", "quotaserver.db-wal"]
    files += ["quotaserver.db-shm"]
    for name in files:
        mode = stat.S_IMODE(os.stat(tmp_path / name).st_mode)
        assert mode == 0o600, (name, oct(mode))


@pytest.mark.gen_test(timeout=60)
async def test_existing_database_files_readable_by_others_are_made_private(app_factory, tmp_path):
    app = await app_factory()
    await app.stop()
    os.chmod(tmp_path / "quotaserver.db", 0o644)
    app = await app_factory()
    assert stat.S_IMODE(os.stat(tmp_path / "quotaserver.db").st_mode) == 0o600


@pytest.mark.gen_test(timeout=60)
async def test_token_digests_never_reach_the_log_even_at_debug(app_factory, caplog):
    caplog.set_level(logging.DEBUG)
    app = await app_factory(server__log_level="debug")
    made = await call(app, "POST", "/api/admin/tokens", {"name": "ci", "role": "viewer"})
    token = made.json["token"]
    await call(app, "GET", "/api/ws/health", token=token)
    await call(app, "DELETE", f"/api/admin/tokens/{made.json['token_id']}")
    await call(app, "GET", "/api/ws/health", token=token)
    digests = [hashlib.sha256(t.encode()).hexdigest() for t in (token, ADMIN, VIEWER)]
    logged = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    assert "token ci (viewer) created by test-admin" in logged
    for d in digests:
        assert d not in logged, d[:8]


# -- 7. failed authentication --------------------------------------------------------------
@pytest.mark.gen_test(timeout=60)
async def test_failed_authentication_is_limited_per_address_before_the_token(app_factory):
    app = await app_factory(auth__failed_attempts_per_ip=5, server__xheaders=True)
    now = [0.0]
    app.auth.failures.clock = lambda: now[0]
    guesser = {"X-Real-IP": "203.0.113.7"}
    for i in range(5):
        guess = f"guess-{i}-0123456789abcdef"
        resp = await call(app, "GET", "/api/ws/health", token=guess, headers=guesser)
        assert resp.code == 401, i
    # Past the limit: 429 on every route, even with a valid token (checked before it).
    for path, token in (("/api/ws/health", VIEWER), ("/api/health", None)):
        resp = await call(app, "GET", path, token=token, headers=guesser)
        assert resp.code == 429 and resp.json["error"]["code"] == "too_many_failures", path
        assert 1 <= int(resp.headers["Retry-After"]) <= 60
    resp = await call(
        app, "POST", "/api/quotas/consume", {"user": "a"}, token=SERVICE, headers=guesser
    )
    assert resp.code == 429
    with pytest.raises(HTTPClientError) as refused:
        await ws_connect(app, token=VIEWER, headers=guesser)
    assert refused.value.code == 429
    form, _ = await login(app, "token", VIEWER, guesser)
    assert form.code == 429
    # Other addresses are unaffected, and the window passes.
    other = {"X-Real-IP": "203.0.113.8"}
    assert (await call(app, "GET", "/api/ws/health", token=VIEWER, headers=other)).code == 200
    now[0] += 61
    assert (await call(app, "GET", "/api/ws/health", token=VIEWER, headers=guesser)).code == 200


@pytest.mark.gen_test(timeout=60)
async def test_wrong_login_form_tokens_count_as_failures(app_factory):
    app = await app_factory(auth__failed_attempts_per_ip=3)
    for i in range(3):
        resp, xsrf = await login(app, "token", f"wrong-{i}-0123456789abcdef")
        assert resp.code == 401
    body = f"token={quote(ADMIN)}&_xsrf={xsrf}"
    hdrs = {"Cookie": f"_xsrf={xsrf}", "Content-Type": FORM}
    resp = await call(app, "POST", "/login", raw=body, token=None, headers=hdrs)
    assert resp.code == 429 and SESSION_COOKIE not in cookies_of(resp)
    assert (await call(app, "GET", "/login", token=None)).code == 429


# -- 8. smaller fixes ----------------------------------------------------------------------
@pytest.mark.gen_test(timeout=60)
async def test_xsrf_cookie_is_secure_behind_x_forwarded_proto_https(app_factory):
    app = await app_factory(server__xheaders=True)
    https = {"X-Forwarded-Proto": "https"}
    form = await call(app, "GET", "/login", token=None, headers=https)
    assert "secure" in set_cookie_flags(form, "_xsrf")
    resp, _ = await login(app, "token", VIEWER, https)
    assert "secure" in set_cookie_flags(resp, SESSION_COOKIE)
    page = await call(app, "GET", "/admin/quotas", token=VIEWER, headers=https)
    assert "secure" in set_cookie_flags(page, "_xsrf")
    plain = await call(app, "GET", "/login", token=None)
    assert "secure" not in set_cookie_flags(plain, "_xsrf")


@pytest.mark.gen_test(timeout=60)
async def test_version_only_in_the_authenticated_health_answer(app_factory):
    app = await app_factory()
    public = await call(app, "GET", "/api/health", token=None)
    assert public.code == 200 and "version" not in public.json
    assert (await call(app, "GET", "/api/ws/health", token=VIEWER)).json["version"]


@pytest.mark.gen_test(timeout=60)
async def test_cursors_accept_ascii_digits_only(app_factory):
    app = await app_factory()
    for i in range(4):
        assert (await consume(app, f"user{i}")).code == 200
    for cursor in ("\u0663", "\uff13", "1_0", "+3", "3\u200b"):
        ws = await ws_connect(app, query=f"last_seq={quote(cursor)}", token=VIEWER)
        recovered = (await ws.recv_type("recovered"))["data"]
        assert recovered["recovered"] is False and recovered["reason"] == "invalid_cursor", cursor
        ws.close()
        sse = await sse_connect(app, query=f"last_event_id={quote(cursor)}", token=VIEWER)
        recovered = (await sse.next_type("recovered"))["message"]["data"]
        assert recovered["reason"] == "invalid_cursor", cursor
        resp = await call(app, "GET", f"{API}/events?before={quote(cursor)}", token=VIEWER)
        assert resp.code == 400 and resp.json["error"]["code"] == "invalid_parameter", cursor
    ws = await ws_connect(app, query="last_seq=0", token=VIEWER)
    assert (await ws.recv_type("recovered"))["data"]["recovered"] is True
    ws.close()


def run_server_until_exit(tmp_path: Any) -> subprocess.CompletedProcess:
    """run.py with the first-run token file in tmp_path/data (no admin configured)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTASERVER_")}
    env["QUOTASERVER_SERVER_PORT"] = "0"
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "run.py")],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("name", "content", "mode", "why"),
    [
        ("admin_token", "x\n", 0o600, "fewer than 16"),
        ("admin_token", "a-long-enough-token-0123456789\n", 0o644, "mode 0644"),
        ("admin_token", "a-long-enough-token-0123456789\n", 0o640, "mode 0640"),
        ("cookie_secret", "a-long-enough-secret-0123456789\n", 0o644, "mode 0644"),
        ("cookie_secret", "short\n", 0o600, "fewer than 16"),
    ],
    ids=["short-token", "token-0644", "token-0640", "secret-0644", "short-secret"],
)
def test_weak_or_readable_secret_files_stop_start_up_with_exit_2(
    tmp_path, name, content, mode, why
):
    data = tmp_path / "data"
    data.mkdir()
    path = data / name
    path.write_text(content)
    os.chmod(path, mode)
    done = run_server_until_exit(tmp_path)
    assert done.returncode == 2, done.stderr
    key = "auth.token_file" if name == "admin_token" else "auth.cookie_secret"
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"quotaserver: configuration error: {key}: ")
    assert str(path.relative_to(tmp_path)) in line and why in line, line
    assert "Traceback" not in done.stderr
    if len(content.strip()) >= 16:
        assert content.strip() not in done.stderr + done.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root (CI is)")
@pytest.mark.parametrize(
    ("case", "key", "why"),
    [
        ("owner", "auth.token_file: data/admin_token", "owned by uid 65534"),
        # The cookie secret is the first file the server reads or writes there.
        ("directory", "auth.cookie_secret: data/cookie_secret", "which other users can write"),
    ],
)
def test_secret_files_of_another_user_or_in_a_shared_directory_stop_start_up(
    tmp_path, case, key, why
):
    data = tmp_path / "data"
    data.mkdir()
    path = data / "admin_token"
    path.write_text("a-long-enough-token-0123456789\n")
    os.chmod(path, 0o600)
    if case == "owner":
        os.chown(path, 65534, 65534)  # nobody: they could have chosen our admin token
    else:
        os.chmod(data, 0o777)  # anyone could swap the file for one of theirs
    done = run_server_until_exit(tmp_path)
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"quotaserver: configuration error: {key} "), line
    assert why in line, line
    assert "Traceback" not in done.stderr


@pytest.mark.gen_test(timeout=60)
async def test_a_symlink_planted_at_a_secret_path_is_replaced_not_written_through(
    app_factory, tmp_path
):
    target = tmp_path / "somewhere-else"
    link = tmp_path / "admin_token"
    link.symlink_to(target)  # dangling: an attacker waiting for the server to write there
    app = await app_factory(auth__tokens=[], auth__token_file=str(link))
    assert app.auth.first_run_token
    assert not target.exists() and not link.is_symlink()
    assert link.read_text().strip() == app.auth.first_run_token
    assert stat.S_IMODE(link.stat().st_mode) == 0o600


@pytest.mark.gen_test(timeout=60)
async def test_the_xsrf_token_is_bound_to_its_session(app_factory):
    app = await app_factory()
    mine = await session_headers(app, ADMIN)
    body = {"name": "bound", "role": "viewer"}
    ok = await call(app, "POST", "/api/admin/tokens", body, token=None, headers=mine)
    assert ok.code == 201, ok
    # Another XSRF token, valid as a pair (cookie = header) but issued to no session of ours:
    # what a cookie planted from a sibling domain would give.
    planted = cookies_of(await call(app, "GET", "/login", token=None))["_xsrf"]
    session = mine["Cookie"].split(";")[0]
    forged = {"Cookie": f"{session}; _xsrf={planted}", "X-XSRFToken": planted}
    body = {"name": "forged", "role": "admin"}
    refused = await call(app, "POST", "/api/admin/tokens", body, token=None, headers=forged)
    assert refused.code == 403 and refused.json["error"]["code"] == "xsrf", refused
    names = {t["name"] for t in (await call(app, "GET", "/api/admin/tokens")).json["tokens"]}
    assert "bound" in names and "forged" not in names
    # The dashboard hands a browser that lost its _xsrf cookie the session's token again.
    page = await call(app, "GET", "/admin/quotas", token=None, headers={"Cookie": session})
    restored = cookies_of(page)["_xsrf"]
    again = {"Cookie": f"{session}; _xsrf={restored}", "X-XSRFToken": restored}
    body = {"name": "restored", "role": "viewer"}
    assert (
        await call(app, "POST", "/api/admin/tokens", body, token=None, headers=again)
    ).code == 201


# -- 3. connection hygiene (in process; the fd-limit attack is in test_hardening_net.py) --
async def read_until_closed(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            data += chunk
    return data


@pytest.mark.gen_test(timeout=60)
async def test_idle_keep_alive_connections_close_after_idle_timeout_not_header_timeout(
    app_factory,
):
    # A header timeout far beyond the wait below: only the idle timeout can close it.
    app = await app_factory(server__header_timeout=600.0, server__idle_timeout=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    writer.write(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    answer = await read_until_closed(reader, 30)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:80]
    writer.close()
    # And a head that never finishes is dropped after the header timeout.
    app = await app_factory(server__header_timeout=0.5, server__idle_timeout=600.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    writer.write(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    assert await read_until_closed(reader, 30) == b""
    writer.close()
    # So is a body that never finishes (the header timeout applies to the body too).
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    writer.write(
        b"POST /api/quotas/check HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"user":'
    )
    assert await read_until_closed(reader, 30) == b""
    writer.close()
    # A keep-alive connection that goes on sending is served past either timeout.
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    for _ in range(4):
        writer.write(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
        await reader.readexactly(length)
        await asyncio.sleep(0.3)
    writer.close()


@pytest.mark.gen_test(timeout=60)
async def test_connections_beyond_the_per_address_cap_are_closed_at_accept(app_factory):
    app = await app_factory(server__max_connections_per_ip=3)
    held = [await asyncio.open_connection("127.0.0.1", app.port) for _ in range(3)]
    for _, writer in held:
        writer.write(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    for reader, _ in held:
        assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
    reader, writer = await asyncio.open_connection("127.0.0.1", app.port)
    writer.write(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert await read_until_closed(reader, 30) == b""  # closed without an answer
    writer.close()
    assert app.server.refused == 1
    held[0][1].close()
    await held[0][1].wait_closed()

    async def served() -> bool:
        r, w = await asyncio.open_connection("127.0.0.1", app.port)
        w.write(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = await read_until_closed(r, 30)
        w.close()
        return data.startswith(b"HTTP/1.1 200")

    # A freed slot is usable again (the server notices the close on its next read).
    for _ in range(100):
        if await served():
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("a freed slot was never reused")
    for _, writer in held[1:]:
        writer.close()


def test_run_py_refuses_auth_disabled_on_a_network_address_with_exit_2(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTASERVER_")}
    env["QUOTASERVER_AUTH_ENABLED"] = "false"
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "run.py"), "--host", "0.0.0.0", "--port", "0"],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "auth.allow_disabled_on_network" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "data").exists()  # refused before anything was created


@pytest.mark.gen_test(timeout=60)
async def test_concurrent_revocations_cannot_remove_the_last_admin(app_factory):
    app = await app_factory()
    made = await call(app, "POST", "/api/admin/tokens", {"name": "ops", "role": "admin"})
    tokens = (await call(app, "GET", "/api/admin/tokens")).json["tokens"]
    admins = [t["token_id"] for t in tokens if t["role"] == "admin" and not t["revoked"]]
    assert len(admins) == 2
    answers = await asyncio.gather(
        *(call(app, "DELETE", f"/api/admin/tokens/{token_id}", token=made.json["token"])
          for token_id in admins)
    )  # fmt: skip
    # The second is refused: as the last admin (409), or, when the first revoked the very
    # token it authenticates with before its own check ran, as unauthenticated (401).
    codes = sorted(a.code for a in answers)
    assert codes in ([200, 409], [200, 401]), answers
    still = [
        (await call(app, "GET", "/api/admin/tokens", token=t)).code
        for t in (ADMIN, made.json["token"])
    ]
    assert sorted(still) == [200, 401], still  # exactly one admin token is left
