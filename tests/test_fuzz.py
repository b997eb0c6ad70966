"""Property-based tests (hypothesis) of the JSON API and of WebSocket client messages.

Properties: no 500 and no crash; every refusal is the JSON error envelope; no partial
write (counters, violations, events and audit rows agree with what the responses said
after every example); the server keeps serving other clients.

Hypothesis drives synchronous test functions, so the real server runs on its own event
loop in a thread, and each example runs its requests on a client loop of the test's.
Consistency is read straight from the SQLite file with a second connection.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import quote, urlencode

import pytest
import tornado.websocket
from clients import ADMIN, SERVICE, VIEWER, call, ws_connect
from conftest import FakeClock, make_config
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from tornado.httpclient import HTTPClientError
from tornado.websocket import WebSocketClosedError

from quotaserver import urls
from quotaserver.app import QuotaApp
from quotaserver.handlers.sse import AdminEventsHandler

PERIODS = ("daily", "weekly", "monthly")
JSON = "application/json"
FUZZ_SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
DECISION_CODES = {200, 429}
ERROR_CODES = {400, 404, 405, 409, 411, 413, 415, 422}
# Allowed WebSocket close codes after client abuse: unsupported data, policy, too big.
ABUSE_CLOSE_CODES = {1003, 1008, 1009}


class ServerThread:
    """The real application on its own event loop in a thread; a client loop for tests."""

    def __init__(self, tmp_path: Any, **overrides: Any):
        values = {
            "auth__connect_attempts_per_ip": 1_000_000,
            "auth__max_connections_per_identity": 10_000,
        }
        values.update(overrides)
        self.config = make_config(tmp_path, **values)
        self.db_path = f"{tmp_path}/quotaserver.db"
        self.app: QuotaApp | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.client_loop = asyncio.new_event_loop()

    def start(self) -> None:
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                self.app = QuotaApp(self.config, clock=FakeClock(), env={})
                loop.run_until_complete(self.app.start())
            except BaseException as exc:  # noqa: BLE001 - reported to the test thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=serve, name="fuzz-server", daemon=True)
        self._thread.start()
        assert ready.wait(30), "server did not start"
        if failure:
            raise failure[0]

    def stop(self) -> None:
        assert self._loop is not None and self.app is not None
        asyncio.run_coroutine_threadsafe(self.app.stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self.client_loop.close()

    @property
    def url(self) -> str:
        assert self.app is not None
        return self.app.url

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        """Run a client coroutine to completion on the test's loop."""
        return self.client_loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def close_client(self, ws: Any) -> None:
        """Close a client connection on the loop it lives on (none is current out here)."""

        async def close() -> None:
            ws.close()

        self.run(close())

    def on_server(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        """Run a coroutine on the server's own loop (direct service calls)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def query(self, sql: str, *args: Any) -> list[tuple]:
        with sqlite3.connect(self.db_path) as db:
            return db.execute(sql, args).fetchall()


@pytest.fixture
def server(tmp_path: Any) -> Callable[..., ServerThread]:
    started: list[ServerThread] = []

    def start(**overrides: Any) -> ServerThread:
        srv = ServerThread(tmp_path, **overrides)
        srv.start()
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


def assert_envelope(resp: Any) -> None:
    """A 4xx is the JSON error envelope, with a code and a message."""
    body = resp.json
    assert set(body) == {"error"}, resp
    assert isinstance(body["error"]["code"], str) and body["error"]["code"], resp
    assert isinstance(body["error"]["message"], str), resp


# -- strategies ---------------------------------------------------------------------------
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)


def _containers(inner: st.SearchStrategy) -> st.SearchStrategy:
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)


json_values = st.recursive(json_scalars, _containers, max_leaves=6)
NAMES = ["alice", "bob", "<img src=x onerror=alert(1)>", "ü ß", "x" * 64]
users = st.sampled_from(NAMES) | st.text(max_size=70)
command_types = st.sampled_from(["shell", "code", "test", "yearly"]) | st.text(max_size=10)
counts = st.sampled_from([1, 1, 2, 499, 500, 501, 10_000, 10_001, 0, -1]) | st.integers(-5, 400)
counts_or_junk = counts | json_values
quota_bodies = (
    st.fixed_dictionaries(
        {"user": users, "command_type": command_types},
        optional={"count": counts_or_junk, "extra": json_values},
    )
    | st.dictionaries(st.sampled_from(["user", "command_type", "count"]), json_values)
    | json_values
)
raw_bodies = (
    quota_bodies.map(lambda body: json.dumps(body).encode())
    | st.binary(max_size=64)
    | st.text(max_size=64).map(str.encode)
)
# Well-formed requests for a few users near small limits, so that admissions and denials
# both happen often; the junk above explores the refusals.
plausible_quota_raw = st.fixed_dictionaries(
    {
        "user": st.sampled_from(["alice", "bob", "ü ß"]),
        "command_type": st.sampled_from(["shell", "code", "test"]),
        "count": st.integers(1, 4),
    }
).map(lambda body: json.dumps(body).encode())
content_types = st.sampled_from(
    ["application/json", "application/json", "application/json; charset=utf-8", "text/plain", ""]
)


# -- the quota API --------------------------------------------------------------------------
def test_quota_api_never_fails_and_never_writes_half(server):
    srv = server()
    # Small limits on the command types the strategies favour: denials (and so violation
    # rows and events) are common, not a corner the run may never reach.
    for command_type in ("shell", "code", "test"):
        srv.on_server(srv.app.rules.set_global_limits(command_type, {"daily": 5}, actor="fuzz"))
    used: Counter[tuple[str, str]] = Counter()
    violations: Counter[tuple[str, str]] = Counter()
    outcomes: Counter[str] = Counter()

    def send(endpoint: str, raw: bytes, content_type: str) -> None:
        headers = {"Content-Type": content_type}
        path = f"/api/quotas/{endpoint}"
        resp = srv.run(call(srv, "POST", path, raw=raw, token=SERVICE, headers=headers))
        assert resp.code in DECISION_CODES | ERROR_CODES, resp
        outcomes[f"{endpoint} {resp.code}"] += 1
        if resp.code in ERROR_CODES:
            assert_envelope(resp)
            return
        decision = resp.json
        key = (decision["user"], decision["command_type"])
        if endpoint == "consume" and resp.code == 200:
            used[key] += decision["count"]
        elif endpoint == "consume":
            assert decision["reason"] == "quota_exceeded", decision
            violations[key] += 1
        # What the response reports is what the windows hold (all windows alike).
        if endpoint == "consume":
            reported = {decision["periods"][p]["used"] for p in PERIODS}
            assert reported == {used[key]}, (decision, used[key])

    @settings(FUZZ_SETTINGS, max_examples=150)
    @given(
        endpoint=st.sampled_from(["consume", "consume", "check"]),
        raw=raw_bodies,
        content_type=content_types,
        # Every example also sends one well-formed request (a one_of would mostly draw
        # junk), so admissions and denials keep happening between the junk.
        good=plausible_quota_raw,
    )
    # Found by this test: deep nesting and unpaired surrogates used to be 500s.
    @example(endpoint="consume", raw=b"[" * 50_000, content_type=JSON, good=b"{}")
    @example(
        endpoint="consume",
        raw=b'{"user": "\\ud800", "command_type": "shell"}',
        content_type=JSON,
        good=b"{}",
    )
    @example(
        endpoint="consume",
        raw=b'{"user": "a", "command_type": "shell", "count": 1e400}',
        content_type=JSON,
        good=b"{}",
    )
    @example(
        endpoint="consume",
        raw=b'{"user": "a\\u0000", "command_type": "shell"}',
        content_type=JSON,
        good=b"{}",
    )
    def check(endpoint: str, raw: bytes, content_type: str, good: bytes) -> None:
        send(endpoint, raw, content_type)
        send(endpoint, good, JSON)
        assert_consistent(srv, used, violations)
        assert srv.run(call(srv, "GET", "/api/health", token=None)).code == 200

    check()
    # The run reached every interesting path: admissions, denials with their violation rows
    # and events, checks, and refusals. Otherwise the consistency checks compared empty sets.
    assert sum(violations.values()) >= 10, outcomes
    assert sum(used.values()) >= 10, outcomes
    assert outcomes["consume 200"] and outcomes["consume 429"] and outcomes["check 200"], outcomes
    assert any(outcomes[f"consume {code}"] for code in ERROR_CODES), outcomes


def assert_consistent(srv: ServerThread, used: Counter, violations: Counter) -> None:
    """The database holds exactly what the responses said: all windows or none."""
    rows = srv.query(
        "SELECT u.username, g.command_type, g.period, g.used FROM usage g "
        "JOIN user u ON u.id = g.user_id"
    )
    by_key: dict[tuple[str, str], dict[str, int]] = {}
    for username, command_type, period, count in rows:
        by_key.setdefault((username, command_type), {})[period] = count
    for key, periods in by_key.items():
        assert set(periods) == set(PERIODS), (key, periods)
        assert set(periods.values()) == {used[key]}, (key, periods, used[key])
    assert {k for k, v in used.items() if v} <= set(by_key)
    recorded = Counter(
        (username, command_type)
        for username, command_type in srv.query(
            "SELECT u.username, v.command_type FROM violation v JOIN user u ON u.id = v.user_id"
        )
    )
    assert recorded == +violations
    events = srv.query("SELECT COUNT(*) FROM event WHERE type = 'violation'")[0][0]
    assert events == sum(violations.values())
    # Never over-admitted: every counter within its limit.
    over = srv.query(
        "SELECT COUNT(*) FROM usage g JOIN quota_rule r ON r.scope = '' "
        "AND r.command_type = g.command_type AND r.period = g.period "
        'WHERE r."limit" IS NOT NULL AND g.used > r."limit"'
    )[0][0]
    assert over == 0


# -- every admin route: reads and writes ---------------------------------------------------
STATE_CHANGING = ("POST", "PUT", "PATCH", "DELETE")
QUERY_KEYS = [
    "page", "per_page", "q", "sort", "status", "severity", "user", "command_type", "since",
    "action", "actor", "period", "minutes", "load_minutes", "types", "after", "limit",
]  # fmt: skip
BODY_KEYS = [
    "limits", "name", "role", "command_type", "username", "periods", "user", "count",
    "type", "data", "severity", "message", "token",
]  # fmt: skip
good_limits = st.dictionaries(
    st.sampled_from(PERIODS), st.none() | st.integers(0, 10**6), min_size=1, max_size=3
)
limits_values = good_limits | st.dictionaries(
    st.sampled_from([*PERIODS, "hourly", "yearly", ""]),
    st.none() | st.integers(-2, 2**63) | st.text(max_size=3) | st.floats(),
    max_size=4,
)
# Bodies close to what the admin API accepts, so that writes get past validation...
known_types = st.sampled_from(["shell", "code"])
roles = st.sampled_from(["admin", "viewer", "service", "root"])
plausible_bodies = st.one_of(
    st.fixed_dictionaries({"limits": good_limits}),
    st.fixed_dictionaries({"limits": good_limits, "command_type": known_types}),
    st.fixed_dictionaries({"command_type": known_types}),
    st.fixed_dictionaries({"name": st.text(max_size=70), "role": roles}),
    st.just({}),
)
# ...and anything at all, so that validation itself is exercised.
admin_bodies = plausible_bodies | st.one_of(
    st.dictionaries(st.sampled_from(BODY_KEYS), json_values | limits_values, max_size=4),
    st.fixed_dictionaries(
        {"limits": limits_values}, optional={"command_type": command_types, "username": users}
    ),
    json_values,
)


RULE = r"/api/admin/quotas/rules/([^/]+)"
USER_LIMITS = r"/api/admin/quotas/users/([^/]+)/limits/([^/]+)"
RESET = r"/api/admin/quotas/users/([^/]+)/reset"
TOKENS = r"/api/admin/tokens"
PLAUSIBLE = {
    "users": ["alice", "bob"],
    "limits": ["shell", "code"],
    "rules": ["shell", "code"],
    "alerts": ["1", "2"],
}


def _route_strategy() -> st.SearchStrategy[tuple[str, str, str]]:
    """(method, pattern, path) over every HTTP route; path groups drawn from their regex."""
    from routes import group_spans, implemented

    choices = []
    for pattern, cls in urls.ROUTES + urls.DEV_ROUTES:
        if issubclass(cls, tornado.websocket.WebSocketHandler | AdminEventsHandler):
            continue  # the streams have their own properties below
        for method in implemented(cls):
            if method in STATE_CHANGING:
                choices += [(method, pattern)] * 3  # writes are where partial writes hide
            elif method == "GET":
                choices.append((method, pattern))

    @st.composite
    def draw(draw_: Any) -> tuple[str, str, str]:
        method, pattern = draw_(st.sampled_from(choices))
        path, last = "", 0
        for start, end in group_spans(pattern):
            group = pattern[start + 1 : end - 1]
            # Plausible values by the segment before the group, so writes can succeed.
            before = pattern[last:start].rstrip("/").rsplit("/", 1)[-1]
            samples = st.sampled_from(PLAUSIBLE.get(before, ["alice", "shell", "1"]))
            value = draw_(samples | samples | st.from_regex(group, fullmatch=True))
            path += pattern[last:start].replace("\\", "") + quote(value, safe="")
            last = end
        return method, pattern, path + pattern[last:].replace("\\", "")

    return draw()


def test_every_route_survives_arbitrary_input_and_writes_are_all_or_nothing(server):
    srv = server(dev=True)
    for user in ("alice", "bob"):  # existing users, so that per-user writes can succeed
        body = {"user": user, "command_type": "shell"}
        assert srv.run(call(srv, "POST", "/api/quotas/consume", body, token=SERVICE)).code == 200
    outcomes: Counter[tuple[str, int]] = Counter()

    @settings(FUZZ_SETTINGS, max_examples=200)
    @given(
        route=_route_strategy(),
        body=admin_bodies,
        query=st.dictionaries(st.sampled_from(QUERY_KEYS), st.text(max_size=12), max_size=3),
        role=st.sampled_from([ADMIN, ADMIN, ADMIN, VIEWER]),
    )
    # Writes known to succeed, whatever the random search finds: the invariants below
    # are checked after real changes in every run.
    @example(
        route=("PUT", RULE, "/api/admin/quotas/rules/shell"),
        body={"limits": {"daily": 90}},
        query={},
        role=ADMIN,
    )
    @example(
        route=("PUT", USER_LIMITS, "/api/admin/quotas/users/alice/limits/code"),
        body={"limits": {"weekly": 5}},
        query={},
        role=ADMIN,
    )
    @example(
        route=("DELETE", USER_LIMITS, "/api/admin/quotas/users/alice/limits/code"),
        body=None,
        query={},
        role=ADMIN,
    )
    @example(
        route=("POST", RESET, "/api/admin/quotas/users/alice/reset"), body={}, query={}, role=ADMIN
    )
    @example(
        route=("POST", TOKENS, "/api/admin/tokens"),
        body={"name": "fuzz", "role": "viewer"},
        query={},
        role=ADMIN,
    )
    def check(route: tuple[str, str, str], body: Any, query: dict, role: str) -> None:
        method, pattern, path = route
        first = next((p for p, _ in urls.ROUTES + urls.DEV_ROUTES if re.fullmatch(p, path)), None)
        assume(first == pattern)
        target = path + ("?" + urlencode(query) if query else "")
        payload = json.dumps(body) if method in ("POST", "PUT", "PATCH") else None
        resp = srv.run(call(srv, method, target, raw=payload, token=role))
        outcomes[method, resp.code] += 1
        assert resp.code < 500, (method, target, payload, resp)
        if resp.code >= 400:
            assert_envelope(resp)
        assert_audit_matches_changes(srv)
        assert srv.run(call(srv, "GET", "/api/health", token=None)).code == 200

    check()
    # The strategies reach past validation, not only into it: writes succeed too.
    writes_done = sum(n for (m, code), n in outcomes.items() if m != "GET" and code < 300)
    assert writes_done >= 5, outcomes
    print("admin fuzz outcomes:", dict(sorted(outcomes.items())))


def assert_audit_matches_changes(srv: ServerThread) -> None:
    """Every change was written together with its audit row (and event), or not at all."""
    actions = Counter(dict(srv.query("SELECT action, COUNT(*) FROM audit_log GROUP BY action")))
    quota_events = srv.query(
        "SELECT COUNT(*) FROM event WHERE type = 'quota_change' "
        "AND data NOT LIKE '%\"test\": true%'"
    )[0][0]
    rule_audits = sum(n for a, n in actions.items() if a.startswith(("limits.", "usage.")))
    assert quota_events == rule_audits, (quota_events, actions)
    created = srv.query("SELECT COUNT(*) FROM api_token WHERE source = 'api'")[0][0]
    revoked = srv.query("SELECT COUNT(*) FROM api_token WHERE revoked_at IS NOT NULL")[0][0]
    assert actions["token.create"] == created and actions["token.revoke"] == revoked
    bad_rules = srv.query(
        'SELECT COUNT(*) FROM quota_rule WHERE "limit" < 0 '
        "OR period NOT IN ('hourly', 'daily', 'weekly', 'monthly')"
    )[0][0]
    assert bad_rules == 0


# -- WebSocket client messages ---------------------------------------------------------------
ws_messages = st.lists(
    st.one_of(
        json_values.map(json.dumps),
        st.sampled_from(['{"type": "ping"}', '{"type": "subscribe", "types": ["alert"]}']),
        st.fixed_dictionaries(
            {"type": st.sampled_from(["subscribe", "ping", "pong", "unsubscribe", "", "welcome"])},
            optional={"types": json_values | st.lists(st.text(max_size=12), max_size=4)},
        ).map(json.dumps),
        st.text(max_size=40),
        st.text(max_size=40),
        st.binary(max_size=16),
    ),
    min_size=1,
    max_size=10,
)


async def _exchange(srv: ServerThread, messages: list[str | bytes], query: str) -> list[Any]:
    """Send ``messages`` then a ping; read until the pong or the close."""
    ws = await ws_connect(srv, query=query, token=VIEWER)
    try:
        await ws.recv_type("welcome")
        for message in messages:
            try:
                await ws.send(message)
            except WebSocketClosedError:
                break
        try:
            await ws.send({"type": "ping"})
            while (await ws.recv())["type"] != "pong":
                pass
        except (WebSocketClosedError, TypeError):
            pass  # closed by the server: recv() gave None
        return [ws.conn.close_code, ws.messages]
    finally:
        ws.close()


def test_websocket_client_messages_never_crash_the_connection_or_the_server(server):
    # The bystander pings once per example: lift the flood limit (tested in test_security).
    srv = server(auth__ws_message_rate=10_000.0, auth__ws_message_burst=10_000)
    bystander = srv.run(ws_connect(srv, token=ADMIN))
    srv.run(bystander.recv_type("welcome"))
    closes: Counter[Any] = Counter()

    @settings(FUZZ_SETTINGS, max_examples=120)
    @given(
        messages=ws_messages,
        query=st.sampled_from(["", "types=violation", "last_seq=0"])
        | st.dictionaries(
            st.sampled_from(["types", "last_seq"]), st.text(max_size=12), max_size=2
        ).map(urlencode),  # fmt: skip
    )
    @example(messages=["x" * (65 * 1024)], query="")
    @example(messages=['{"type": "ping"}'] * 8 + ["[" * 10_000], query="")
    @example(messages=["{"] * 7, query="")  # more bad messages than tolerated: 1008
    def check(messages: list[str | bytes], query: str) -> None:
        try:
            close_code, received = srv.run(_exchange(srv, messages, query))
        except HTTPClientError as exc:  # a bad query is refused before the upgrade
            assert exc.code == 400, exc
            return
        closes[close_code] += 1
        assert close_code is None or close_code in ABUSE_CLOSE_CODES, (close_code, received)
        for message in received:
            assert isinstance(message, dict) and isinstance(message.get("type"), str)
            if message["type"] == "error":
                assert set(message["data"]) == {"code", "message"}
        if close_code is None:  # still open: it answered the final ping
            assert received[-1]["type"] == "pong"
        # Others are still served: the long-lived connection and a plain request.
        srv.run(bystander.send({"type": "ping"}))
        srv.run(bystander.recv_type("pong"))
        assert srv.run(call(srv, "GET", "/api/health", token=None)).code == 200

    check()
    assert closes[None] > 0 and closes[1008] > 0 and closes[1009] > 0, closes
    print("WebSocket fuzz close codes:", dict(closes))
    srv.close_client(bystander)


def test_stream_handshake_parameters_are_validated(server):
    srv = server()

    @settings(FUZZ_SETTINGS, max_examples=60)
    @given(
        params=st.dictionaries(
            st.sampled_from(["types", "last_seq", "last_event_id"]),
            st.text(max_size=40),
            max_size=3,
        ),
        last_event_id=st.none()
        | st.text(
            alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=20
        ),  # fmt: skip
    )
    def check(params: dict[str, str], last_event_id: str | None) -> None:
        query = urlencode(params)
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}

        async def sse_head() -> int:
            from clients import raw_request

            head = await raw_request(
                srv.app, "GET", "/sse/admin/quotas" + (f"?{query}" if query else ""),
                {"Authorization": f"Bearer {VIEWER}", **headers},
            )  # fmt: skip
            return head.code

        assert srv.run(sse_head()) in (200, 400)
        try:
            ws = srv.run(ws_connect(srv, query=query, token=VIEWER))
        except HTTPClientError as exc:
            assert exc.code == 400
        else:
            first = srv.run(ws.recv())
            assert first is not None and first["type"] == "welcome"
            srv.close_client(ws)
        assert srv.run(call(srv, "GET", "/api/health", token=None)).code == 200

    check()
