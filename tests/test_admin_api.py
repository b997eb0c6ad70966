"""The admin REST API over real HTTP against a real SQLite file (and the dashboard page)."""

import base64
import hashlib
import re
from datetime import UTC, datetime
from http.cookies import SimpleCookie
from urllib.parse import quote

import pytest
from clients import ADMIN, SERVICE, VIEWER, call, consume, settle, ws_connect
from conftest import FakeClock

from quotaserver.models import QuotaRule

API = "/api/admin/quotas"
NOON = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def assert_error(resp, status, code=None):
    assert resp.code == status, resp
    error = resp.json["error"]
    assert set(error) == {"code", "message"} and error["message"]
    if code is not None:
        assert error["code"] == code


async def quiet_app(app_factory, **kwargs):
    # The alert engine would add alerts of its own to the violations made here.
    return await app_factory(plugins={"alert_engine": {"enabled": False}}, **kwargs)


# -- access ---------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_reads_admit_viewers_writes_only_admins(app_factory):
    app = await quiet_app(app_factory)
    assert_error(await call(app, "GET", f"{API}/users", token=None), 401, "unauthorized")
    assert_error(await call(app, "GET", f"{API}/users", token=SERVICE), 403, "forbidden")
    for path in ("stats", "users", "rules", "overrides", "violations", "violations/daily",
                 "alerts", "audit", "events", "history"):  # fmt: skip
        assert (await call(app, "GET", f"{API}/{path}", token=VIEWER)).code == 200, path
    body = {"limits": {"daily": 5}}
    assert_error(await call(app, "PUT", f"{API}/rules/shell", body, token=VIEWER), 403)
    assert_error(await call(app, "POST", f"{API}/users/bob/reset", {}, token=VIEWER), 403)
    assert (await call(app, "PUT", f"{API}/rules/shell", body, token=ADMIN)).code == 200


@pytest.mark.gen_test
async def test_bad_input_is_a_4xx_envelope_never_a_500(app_factory):
    app = await quiet_app(app_factory)
    cases = [
        ("GET", "users?page=0", None, 400),
        ("GET", "users?page=x", None, 400),
        ("GET", "users?per_page=1000", None, 400),
        ("GET", "users?sort=age", None, 400),
        ("GET", f"users?q={'x' * 300}", None, 400),
        ("GET", "users/nobody", None, 404),
        ("GET", f"users/{'y' * 100}", None, 400),
        ("GET", "violations?since=yesterday", None, 400),
        ("GET", "violations?command_type=dance", None, 400),
        ("GET", "violations/daily?days=0", None, 400),
        ("GET", "alerts?status=sleeping", None, 400),
        ("GET", "alerts?severity=mild", None, 400),
        ("GET", "events?types=Bad-Type", None, 400),
        ("GET", "events?types=foo", None, 400),  # a type no one sends
        ("GET", "events?limit=-1", None, 400),
        ("GET", "history?minutes=99999", None, 400),
        ("PUT", "rules/dance", {"limits": {"daily": 1}}, 404),
        ("PUT", "rules/shell", {"limits": {"daily": -1}}, 400),
        ("PUT", "rules/shell", {"limits": {"daily": "many"}}, 400),
        ("PUT", "rules/shell", {"limits": {"yearly": 1}}, 400),
        ("PUT", "rules/shell", {"limits": {}}, 400),
        ("PUT", "rules/shell", {"limit": {"daily": 1}}, 400),
        ("PUT", "rules/shell", [1, 2], 400),
        ("POST", "rules", {"limits": {"daily": 1}}, 400),
        ("POST", "rules", {"command_type": "dance", "limits": {"daily": 1}}, 400),
        ("PUT", "users/bob/limits/shell", {"limits": {"daily": True}}, 400),
        ("DELETE", "users/nobody/limits/shell", None, 404),
        ("DELETE", "users/bob/limits/shell?period=yearly", None, 400),
        ("POST", "users/nobody/reset", {}, 404),
        ("POST", "users/bob/reset", {"command_type": "dance"}, 400),
        ("POST", "users/bob/reset", {"everything": True}, 400),
        ("POST", "alerts/999/acknowledge", None, 404),
        ("POST", "alerts/abc/resolve", None, 404),
        ("POST", f"alerts/{10**30}/resolve", None, 404),
        ("POST", "alerts/%C2%B2/acknowledge", None, 404),  # "²" is a digit to str.isdigit
        ("GET", "violations?since=0001-01-01T00:00:00%2B01:00", None, 400),
        ("GET", "violations?since=9999-12-31T23:59:59-01:00", None, 400),
        ("GET", f"events?before={10**30}", None, 400),
        ("PATCH", "rules/shell", {"limits": {"daily": 1}}, 405),
    ]
    for method, path, body, status in cases:
        resp = await call(app, method, f"{API}/{path}", body)
        assert_error(resp, status)
    resp = await call(app, "PUT", f"{API}/rules/shell", raw=b"{not json")
    assert_error(resp, 400, "invalid_json")
    resp = await call(
        app, "PUT", f"{API}/rules/shell", raw=b"{}", headers={"Content-Type": "text/plain"}
    )
    assert_error(resp, 415)


# -- overview -------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_stats_are_the_snapshot_the_stream_sends(app_factory):
    app = await quiet_app(app_factory)
    await consume(app, "alice", "shell", 3)
    await consume(app, "bob", "code", 2)
    # Active and high-utilisation users are recounted in the background after a decision.
    await settle(app)
    resp = await call(app, "GET", f"{API}/stats", token=VIEWER)
    assert resp.code == 200
    stats = resp.json["stats"]
    assert stats["total_users"] == 2
    assert stats["active_users_today"] == 2
    assert stats["commands_today"] == 5
    assert stats["violations_today"] == 0
    assert "system_load" in stats
    assert resp.json["seq"] == app.hub.last_seq
    # What a dashboard connecting now is streamed: the same snapshot, field for field.
    app.broadcast_stats()
    ws = await ws_connect(app)
    welcome = await ws.recv_type("welcome")
    streamed = await ws.recv_type("stats")
    ws.close()
    assert streamed["data"].pop("delta") is False
    assert streamed["data"] == stats
    assert welcome["data"]["seq"] == resp.json["seq"]


@pytest.mark.gen_test
async def test_history_has_per_minute_activity_and_only_real_load_samples(app_factory):
    clock = FakeClock(NOON)
    app = await quiet_app(app_factory, clock=clock)
    await app.rules.set_global_limits("shell", {"daily": 4}, actor="test")
    await consume(app, "alice", "shell", 3)
    clock.advance(minutes=2)
    await consume(app, "alice", "shell", 1)
    await consume(app, "alice", "shell", 5)  # refused: a violation in this minute
    resp = await call(app, "GET", f"{API}/history?minutes=5")
    assert resp.code == 200
    activity = resp.json["activity"]
    assert [p["t"] for p in activity] == [int(NOON.timestamp()) + 60 * m for m in range(-2, 3)]
    assert [(p["commands"], p["violations"]) for p in activity] == [
        (0, 0), (0, 0), (3, 0), (0, 0), (1, 1),
    ]  # fmt: skip
    # system_metrics is off in tests: nothing measured, so no load points (never zeros).
    assert resp.json["load"] == []
    # The core sampler keeps its own history: each measurement handed to it is a point.
    app.load.update(42.5, 61.0)
    load = (await call(app, "GET", f"{API}/history")).json["load"]
    assert [(p["cpu_percent"], p["memory_percent"]) for p in load] == [(42.5, 61.0)]


@pytest.mark.gen_test
async def test_load_history_needs_no_plugin(app_factory):
    """With every plugin disabled the core sampler still records and serves its history."""
    off = {"enabled": False}
    app = await app_factory(
        plugins={"alert_engine": off, "quota_analytics": off, "system_metrics": off}
    )
    names = {app.pm.get_name(p) for p in app.pm.get_plugins()}
    assert not names & {"system_metrics", "load_history", "alert_engine", "quota_analytics"}
    app.load.update(10.0, 20.0)
    app.load.update(30.0, 40.0)
    load = (await call(app, "GET", f"{API}/history?load_minutes=1")).json["load"]
    assert [(p["cpu_percent"], p["memory_percent"]) for p in load] == [(10.0, 20.0), (30.0, 40.0)]


@pytest.mark.gen_test(timeout=60)
async def test_the_load_history_survives_a_restart_per_instance(app_factory):
    import time

    from quotaserver.models import LoadPoint
    from quotaserver.throttle import LoadSample

    first = await app_factory(server__instance_name="web1")
    first.load.update(10.0, 20.0)
    first.load.update(30.0, 40.0)
    # A sample older than the window is written, then pruned in the same transaction.
    first.load.history.samples.appendleft(LoadSample(99.0, 99.0, 1.0, time.time() - 1200))
    await first.stop()  # writes what it has not written yet
    second = await app_factory(server__instance_name="web1")
    second.load.update(50.0, 60.0)
    load = (await call(second, "GET", f"{API}/history")).json["load"]
    assert [(p["cpu_percent"], p["memory_percent"]) for p in load] == [
        (10.0, 20.0), (30.0, 40.0), (50.0, 60.0),
    ]  # fmt: skip
    assert [p["t"] for p in load] == sorted(p["t"] for p in load)
    await second.load_log.flush()
    assert await second.store.run(lambda: LoadPoint.select().count()) == 3
    other = await app_factory(server__instance_name="web2")  # another instance's chart
    assert (await call(other, "GET", f"{API}/history")).json["load"] == []


@pytest.mark.gen_test
async def test_violations_per_day_covers_thirty_days_zero_filled(app_factory):
    clock = FakeClock(datetime(2026, 3, 1, 9, 0, tzinfo=UTC))
    app = await quiet_app(app_factory, clock=clock)
    await app.rules.set_global_limits("shell", {"daily": 0}, actor="test")
    for _ in range(2):
        await consume(app, "alice")
    clock.set(datetime(2026, 3, 10, 23, 59, tzinfo=UTC))
    await consume(app, "bob")
    resp = await call(app, "GET", f"{API}/violations/daily")
    days = resp.json["days"]
    assert len(days) == 30
    assert days[0]["date"] == "2026-02-09" and days[-1]["date"] == "2026-03-10"
    by_date = {d["date"]: d["violations"] for d in days}
    assert by_date["2026-03-01"] == 2 and by_date["2026-03-10"] == 1
    assert sum(by_date.values()) == 3 == resp.json["total"]
    assert len((await call(app, "GET", f"{API}/violations/daily?days=7")).json["days"]) == 7


# -- users ----------------------------------------------------------------------------
@pytest.mark.gen_test
async def test_users_search_sort_by_utilisation_risk_and_pages(app_factory):
    clock = FakeClock(NOON)
    app = await quiet_app(app_factory, clock=clock)
    await app.rules.set_global_limits("shell", {"daily": 20}, actor="test")
    usage = {"carol": 20, "alice": 18, "bob": 16, "dave": 1, "Alicia": 2, "a_b": 1, "axb": 1}
    for name, n in usage.items():
        assert (await consume(app, name, "shell", n)).code == 200
    await app.rules.set_user_limits("zed", "code", {"daily": 9}, actor="test")  # idle user

    resp = await call(app, "GET", f"{API}/users?q=ALI", token=VIEWER)  # a name prefix
    assert [u["username"] for u in resp.json["items"]] == ["alice", "Alicia"]
    # LIKE wildcards in the search are literal characters.
    resp = await call(app, "GET", f"{API}/users?q=a_b")
    assert [u["username"] for u in resp.json["items"]] == ["a_b"]

    resp = await call(app, "GET", f"{API}/users?sort=utilization&per_page=3")
    body = resp.json
    assert body["total"] == 8 and body["pages"] == 3 and body["page"] == 1
    assert [u["username"] for u in body["items"]] == ["carol", "alice", "bob"]
    assert [u["risk"] for u in body["items"]] == ["critical", "high", "elevated"]
    alice = body["items"][1]
    assert alice["usage"]["shell"] == {"used": 18, "limit": 20, "percent": 90.0,
                                       "overridden": False}  # fmt: skip
    assert alice["usage"]["code"]["used"] == 0 and alice["max_percent"] == 90.0
    page3 = (await call(app, "GET", f"{API}/users?sort=utilization&per_page=3&page=3")).json
    # The idle user comes last, after everyone active today.
    assert [u["username"] for u in page3["items"]] == ["dave", "zed"]
    assert page3["items"][1]["usage"]["code"] == {"used": 0, "limit": 9, "percent": 0.0,
                                                 "overridden": True}  # fmt: skip
    everyone = (await call(app, "GET", f"{API}/users?per_page=200")).json["items"]
    by_name = sorted(usage | {"zed": 0}, key=lambda name: (name.lower(), name))
    assert [u["username"] for u in everyone] == by_name


@pytest.mark.gen_test
async def test_user_detail_shows_every_period_override_and_default(app_factory):
    app = await quiet_app(app_factory)
    await app.rules.set_user_limits("dana", "shell", {"daily": 7, "monthly": None}, actor="t")
    await consume(app, "dana", "shell", 3)
    await app.rules.set_global_limits("review", {"daily": 0}, actor="test")
    await consume(app, "dana", "review")  # refused
    resp = await call(app, "GET", f"{API}/users/dana", token=VIEWER)
    assert resp.code == 200
    d = resp.json
    assert d["username"] == "dana" and d["periods"] == ["daily", "weekly", "monthly"]
    shell = d["limits"]["shell"]
    assert shell["daily"]["limit"] == 7 and shell["daily"]["overridden"] is True
    assert shell["daily"]["default"] == 500 and shell["daily"]["used"] == 3
    assert shell["daily"]["remaining"] == 4
    assert shell["weekly"] == {**shell["weekly"], "limit": 3000, "overridden": False}
    assert shell["monthly"]["limit"] is None and shell["monthly"]["overridden"] is True
    assert d["violations_today"] == 1
    assert [v["command_type"] for v in d["recent_violations"]] == ["review"]


@pytest.mark.gen_test
async def test_user_names_with_slashes_and_markup_round_trip(app_factory):
    app = await quiet_app(app_factory)
    name = "<img src=x onerror=alert(1)>/ops"
    assert (await consume(app, name, "shell")).code == 200
    resp = await call(app, "GET", f"{API}/users/{quote(name, safe='')}")
    assert resp.code == 200 and resp.json["username"] == name
    resp = await call(app, "POST", f"{API}/users/{quote(name, safe='')}/reset", {})
    assert resp.code == 200 and resp.json["counters_reset"] == 3


# -- rules and overrides ----------------------------------------------------------------
@pytest.mark.gen_test
async def test_rule_changes_apply_broadcast_and_are_audited(app_factory):
    app = await quiet_app(app_factory)
    ws = await ws_connect(app, token=VIEWER)
    await ws.recv_type("welcome")

    resp = await call(app, "PUT", f"{API}/rules/shell", {"limits": {"daily": 2}})
    assert resp.code == 200
    assert resp.json["effective"]["daily"] == 2 and resp.json["actor"] == "test-admin"
    change = await ws.recv_type("quota_change")
    assert change["data"]["command_type"] == "shell" and change["data"]["scope"] == "global"
    assert (await consume(app, "erin", "shell", 2)).code == 200
    assert (await consume(app, "erin", "shell")).code == 429

    resp = await call(
        app, "POST", f"{API}/rules",
        {"command_type": "shell", "username": "erin", "limits": {"daily": 5}},
    )  # fmt: skip
    assert resp.code == 201 and resp.json["scope"] == "user"
    assert (await ws.recv_type("quota_change"))["data"]["username"] == "erin"
    assert (await consume(app, "erin", "shell")).code == 200

    rules = (await call(app, "GET", f"{API}/rules", token=VIEWER)).json
    assert rules["defaults"]["shell"]["daily"] == 2
    assert rules["overrides"] == {"erin": {"shell": {"daily": 5}}}
    assert rules["command_types"] == list(app.quota.command_types)

    # Deleting a global rule makes it unlimited and keeps the row, so the configured
    # default is not seeded back at the next start.
    resp = await call(app, "DELETE", f"{API}/rules/code?period=daily")
    assert resp.code == 200 and resp.json["effective"]["daily"] is None
    assert resp.json["effective"]["weekly"] == 1500

    def global_code_daily():
        return QuotaRule.get(
            (QuotaRule.scope == "") & (QuotaRule.command_type == "code")
            & (QuotaRule.period == "daily")
        ).limit  # fmt: skip

    assert await app.store.run(global_code_daily) is None
    resp = await call(app, "DELETE", f"{API}/rules/code")
    assert set(resp.json["effective"].values()) == {None}

    audit = (await call(app, "GET", f"{API}/audit", token=VIEWER)).json
    assert [e["action"] for e in audit["items"]] == ["limits.update"] * 4
    assert audit["items"][0]["target"] == "rule:code:global"
    assert audit["items"][0]["actor"] == "test-admin"
    assert audit["items"][-1]["details"] == {
        "limits": {"daily": 2},
        "before": {"daily": 500},  # the configured default, replaced: both are audited
        "after": {"daily": 2},
    }
    only = (await call(app, "GET", f"{API}/audit?actor=nobody")).json
    assert only["items"] == [] and only["total"] == 0
    ws.close()


@pytest.mark.gen_test
async def test_user_override_set_list_remove_and_usage_reset(app_factory):
    app = await quiet_app(app_factory)
    path = f"{API}/users/bob/limits/shell"
    assert (await call(app, "PUT", path, {"limits": {"daily": 3, "weekly": None}})).code == 200
    for _ in range(3):
        assert (await consume(app, "bob")).code == 200
    assert (await consume(app, "bob")).code == 429
    items = (await call(app, "GET", f"{API}/overrides?user=bob", token=VIEWER)).json["items"]
    assert {(o["period"], o["limit"]) for o in items} == {("daily", 3), ("weekly", None)}

    resp = await call(app, "POST", f"{API}/users/bob/reset", {"command_type": "shell"})
    assert resp.code == 200 and resp.json["counters_reset"] == 3
    user = (await call(app, "GET", f"{API}/users/bob")).json
    assert user["limits"]["shell"]["daily"]["used"] == 0
    assert (await consume(app, "bob")).code == 200

    resp = await call(app, "DELETE", f"{path}?period=daily")
    assert resp.code == 200 and resp.json["effective"]["daily"] == 500
    assert resp.json["effective"]["weekly"] is None
    resp = await call(app, "DELETE", path)
    assert resp.json["effective"]["weekly"] == 3000
    assert (await call(app, "GET", f"{API}/overrides")).json["items"] == []
    # A reset without a body resets every command type.
    assert (await call(app, "POST", f"{API}/users/bob/reset")).code == 200
    actions = [e["action"] for e in (await call(app, "GET", f"{API}/audit")).json["items"]]
    assert actions == ["usage.reset", "limits.remove_override", "limits.remove_override",
                       "usage.reset", "limits.update"]  # fmt: skip


# -- violations, alerts, events -----------------------------------------------------------
@pytest.mark.gen_test
async def test_violations_filter_by_user_type_and_time_with_pages(app_factory):
    clock = FakeClock(NOON)
    app = await quiet_app(app_factory, clock=clock)
    await app.rules.set_global_limits("shell", {"daily": 0}, actor="test")
    await app.rules.set_global_limits("code", {"daily": 0}, actor="test")
    for _ in range(3):
        await consume(app, "alice", "shell")
    clock.advance(hours=1)
    for _ in range(2):
        await consume(app, "bob", "code")
    all_ = (await call(app, "GET", f"{API}/violations", token=VIEWER)).json
    assert all_["total"] == 5 and all_["items"][0]["username"] == "bob"  # newest first
    v = all_["items"][-1]
    assert (v["username"], v["command_type"], v["period"], v["limit"]) == ("alice", "shell",
                                                                           "daily", 0)  # fmt: skip
    assert v["created_at"] == "2026-03-10T12:00:00.000Z" and "quota exceeded" in v["message"]
    assert (await call(app, "GET", f"{API}/violations?user=alice")).json["total"] == 3
    assert (await call(app, "GET", f"{API}/violations?command_type=code")).json["total"] == 2
    since = quote("2026-03-10T12:30:00+00:00")
    assert (await call(app, "GET", f"{API}/violations?since={since}")).json["total"] == 2
    resp = await call(app, "GET", f"{API}/violations?since=2026-03-10T13:00:00Z&user=alice")
    assert resp.json["total"] == 0
    page2 = (await call(app, "GET", f"{API}/violations?per_page=2&page=2")).json
    assert page2["pages"] == 3 and len(page2["items"]) == 2
    ids = [v["id"] for v in page2["items"]]
    assert ids == sorted(ids, reverse=True)


@pytest.mark.gen_test
async def test_alerts_filter_acknowledge_resolve_reach_the_stream(app_factory):
    app = await quiet_app(app_factory)
    first = await app.alerts.raise_alert("quota_violation", "critical", "5 violations",
                                         action="Review")  # fmt: skip
    await app.alerts.raise_alert("approaching_limit", "high", "90% used")
    ws = await ws_connect(app, token=VIEWER)
    await ws.recv_type("welcome")

    listed = (await call(app, "GET", f"{API}/alerts?status=open", token=VIEWER)).json
    assert [a["alert_type"] for a in listed["items"]] == ["approaching_limit", "quota_violation"]
    assert listed["counts"] == {"open": 2, "acknowledged": 0, "resolved": 0}
    critical = (await call(app, "GET", f"{API}/alerts?severity=critical")).json["items"]
    assert [a["alert_id"] for a in critical] == [first["alert_id"]]
    assert critical[0]["action_needed"] is True and critical[0]["action"] == "Review"

    alert_id = first["alert_id"]
    assert_error(await call(app, "POST", f"{API}/alerts/{alert_id}/acknowledge", token=VIEWER), 403)
    resp = await call(app, "POST", f"{API}/alerts/{alert_id}/acknowledge")
    assert resp.code == 200 and resp.json["status"] == "acknowledged"
    assert resp.json["acknowledged_by"] == "test-admin"
    event = await ws.recv_type("alert")
    assert event["data"]["alert_id"] == alert_id and event["data"]["status"] == "acknowledged"
    active = (await call(app, "GET", f"{API}/alerts?status=active")).json
    assert active["total"] == 2
    assert active["counts"] == {"open": 1, "acknowledged": 1, "resolved": 0}

    resp = await call(app, "POST", f"{API}/alerts/{alert_id}/resolve")
    assert resp.json["status"] == "resolved" and resp.json["resolved_by"] == "test-admin"
    assert (await ws.recv_type("alert"))["data"]["status"] == "resolved"
    resolved = (await call(app, "GET", f"{API}/alerts?status=resolved")).json["items"]
    assert [a["alert_id"] for a in resolved] == [alert_id]
    actions = [e["action"] for e in (await call(app, "GET", f"{API}/audit")).json["items"]]
    assert actions == ["alert.resolve", "alert.acknowledge"]
    ws.close()


@pytest.mark.gen_test
async def test_events_feed_carries_the_seq_to_resume_from(app_factory):
    app = await quiet_app(app_factory)
    await app.rules.set_global_limits("shell", {"daily": 0}, actor="test")
    for name in ("u1", "u2", "u3"):
        await consume(app, name)
    feed = (await call(app, "GET", f"{API}/events?types=violation&limit=2", token=VIEWER)).json
    assert feed["seq"] == app.hub.last_seq
    assert [e["data"]["username"] for e in feed["items"]] == ["u3", "u2"]
    assert all(e["type"] == "violation" and e["timestamp"] for e in feed["items"])
    older = (
        await call(app, "GET", f"{API}/events?types=violation&before={feed['items'][-1]['seq']}")
    ).json
    assert [e["data"]["username"] for e in older["items"]] == ["u1"]
    everything = (await call(app, "GET", f"{API}/events")).json["items"]
    assert {e["type"] for e in everything} == {"violation", "quota_change"}
    # A client that loaded the feed resumes from its seq and misses nothing after it.
    await consume(app, "u4")
    ws = await ws_connect(app, f"last_seq={feed['seq']}", token=VIEWER)
    replayed = await ws.recv_type("violation")
    assert replayed["data"]["username"] == "u4" and replayed["seq"] == feed["seq"] + 1
    assert (await ws.recv_type("recovered"))["data"]["recovered"] is True
    ws.close()


# -- the page -------------------------------------------------------------------------------
def cookies_of(resp) -> dict[str, str]:
    jar = SimpleCookie()
    for header in resp.headers.get_list("Set-Cookie"):
        jar.load(header)
    return {k: v.value for k, v in jar.items()}


@pytest.mark.gen_test
async def test_dashboard_redirects_strangers_and_serves_a_csp_clean_page(app_factory):
    app = await quiet_app(app_factory)
    resp = await call(app, "GET", "/admin/quotas", token=None)
    assert resp.code == 302 and resp.headers["Location"] == "/login?next=%2Fadmin%2Fquotas"
    resp = await call(app, "GET", "/", token=None)
    assert resp.code == 302 and resp.headers["Location"] == "/admin/quotas"
    assert_error(await call(app, "GET", "/admin/quotas", token=SERVICE), 403)

    resp = await call(app, "GET", "/admin/quotas", token=VIEWER)
    assert resp.code == 200
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    html = resp.body.decode()
    assert 'data-role="viewer"' in html
    # Nothing inline but the import map (issue 25), which the CSP admits by its hash alone:
    # every other script is a file, no style attribute, no <style> element.
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, re.S)
    inline = [body for attrs, body in scripts if "src=" not in attrs]
    assert [attrs for attrs, body in scripts if "src=" not in attrs] == [' type="importmap"']
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    csp = resp.headers["Content-Security-Policy"]
    assert f"script-src 'self' 'sha256-{digest}';" in csp and "unsafe-inline" not in csp
    assert all(not body.strip() for attrs, body in scripts if "src=" in attrs)
    assert " style=" not in html and "<style" not in html
    assert "_xsrf" in cookies_of(resp)
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', html):
        assert (await call(app, "GET", asset, token=None)).code == 200, asset


@pytest.mark.gen_test
async def test_a_browser_session_writes_only_with_the_xsrf_header(app_factory):
    app = await quiet_app(app_factory)
    form_xsrf = cookies_of(await call(app, "GET", "/login", token=None))["_xsrf"]
    form = {"Cookie": f"_xsrf={form_xsrf}", "Content-Type": "application/x-www-form-urlencoded"}
    body = f"token={quote(ADMIN)}&_xsrf={form_xsrf}"
    login = await call(app, "POST", "/login", raw=body, token=None, headers=form)
    assert login.code == 302
    session = cookies_of(login)["qs_session"]
    page = await call(app, "GET", "/admin/quotas", token=None,
                      headers={"Cookie": f"qs_session={session}"})  # fmt: skip
    assert page.code == 200
    xsrf = cookies_of(page)["_xsrf"]
    cookie = {"Cookie": f"qs_session={session}; _xsrf={xsrf}"}
    body = {"limits": {"daily": 9}}
    resp = await call(app, "PUT", f"{API}/rules/shell", body, token=None, headers=cookie)
    assert_error(resp, 403, "xsrf")
    resp = await call(app, "PUT", f"{API}/rules/shell", body, token=None,
                      headers={**cookie, "X-XSRFToken": xsrf})  # fmt: skip
    assert resp.code == 200 and resp.json["actor"] == "test-admin"
    assert (await call(app, "GET", f"{API}/stats", token=None, headers=cookie)).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_a_test_violation_is_recorded_as_a_denied_consume_would_be(app_factory):
    """POST /api/ws/test-violation (dev): one more attempt than the user's own daily limit
    allows, stored, counted and sent live like a real one."""
    app = await app_factory(dev=True)
    await app.rules.set_user_limits("gail", "review", {"daily": 3}, actor="test")
    for _ in range(2):
        assert (await consume(app, "gail", "review")).code == 200
    assert (await consume(app, "gail", "code")).code == 200  # another type: not counted
    watcher = await ws_connect(app, "types=violation")
    await watcher.recv_type("welcome")
    resp = await call(
        app, "POST", "/api/ws/test-violation", {"user": "gail", "command_type": "review"}
    )
    assert resp.code == 200
    violation = resp.json["violation"]
    expected = {
        "username": "gail",
        "command_type": "review",
        "period": "daily",
        "limit": 3,
        "attempted": 3,
        "message": "Daily review quota exceeded: 3 attempted, limit 3",
    }
    assert {k: violation[k] for k in expected} == expected
    live = await watcher.recv_type("violation")
    assert live["data"] == violation
    listed = (await call(app, "GET", "/api/admin/quotas/violations?user=gail")).json["items"]
    assert [(v["command_type"], v["attempted"]) for v in listed] == [("review", 3)]
    # An unlimited type: the limit reads 0.
    await app.rules.set_user_limits("gail", "code", {"daily": None}, actor="test")
    body = {"user": "gail", "command_type": "code"}
    other = (await call(app, "POST", "/api/ws/test-violation", body)).json["violation"]
    assert (other["limit"], other["attempted"]) == (0, 2)
