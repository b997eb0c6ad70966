"""The API behind the dashboard as an admin's daily tool (issue 25): consumes refused for load
(throttle factor 0) counted in the stats, per minute in the history, per user today, kept
across a restart; the audit's before/after and its user filter; alerts by user; users
sorted by violations today."""

import csv
import io
import sqlite3

import pytest
from clients import call, consume, settle

from quotaserver import csv_export, migrations, models
from quotaserver import db as db_module

API = "/api/admin/quotas"
# The default bands never refuse (they stop at 0.25): an operator's band at 0 does.
REFUSING = {"throttle__cpu_bands": [[80, 0.5], [95, 0.0]]}


@pytest.mark.gen_test(timeout=60)
async def test_load_refusals_are_counted_per_minute_per_user_and_survive_a_restart(app_factory):
    app = await app_factory(plugins={"alert_engine": {"enabled": False}}, **REFUSING)
    await app.rules.set_global_limits("shell", {"daily": 2}, actor="t")
    assert [(await consume(app, "ann")).code for _ in range(3)] == [200, 200, 429]
    app.load.update(99.5, 10.0)  # the band at 0
    codes = [(await consume(app, "ann")).code for _ in range(4)]
    codes.append((await consume(app, "nobody-yet")).code)  # unknown: counted in the total
    assert codes == [503] * 5
    app.load.update(10.0, 10.0)
    await settle(app)

    stats = app.stats_snapshot()
    assert (stats["commands_today"], stats["violations_today"]) == (2, 1)
    assert stats["load_refusals_today"] == 5

    history = (await call(app, "GET", f"{API}/history?minutes=5")).json
    assert sum(p["refused"] for p in history["activity"]) == 5
    assert sum(p["commands"] for p in history["activity"]) == 2
    # Only the current minute is still being counted.
    assert [p.get("partial", False) for p in history["activity"]] == [False] * 4 + [True]

    users = (await call(app, "GET", f"{API}/users?q=ann")).json
    assert [(u["username"], u["load_refusals_today"]) for u in users["items"]] == [("ann", 4)]
    detail = (await call(app, "GET", f"{API}/users/ann")).json
    assert (detail["load_refusals_today"], detail["violations_today"]) == (4, 1)
    # An unknown user refused for load is not created (nothing was admitted).
    assert (await call(app, "GET", f"{API}/users/nobody-yet")).code == 404

    await app.stop()
    again = await app_factory(plugins={"alert_engine": {"enabled": False}})
    assert again.stats_snapshot()["load_refusals_today"] == 5
    history = (await call(again, "GET", f"{API}/history?minutes=5")).json
    assert sum(p["refused"] for p in history["activity"]) == 5


@pytest.mark.gen_test(timeout=60)
async def test_the_audit_shows_limits_before_and_after_and_filters_by_user(app_factory):
    app = await app_factory(plugins={"alert_engine": {"enabled": False}})
    await app.rules.set_global_limits("shell", {"daily": 800}, actor="root")
    await app.rules.set_user_limits("ann", "shell", {"daily": 800800}, actor="root")
    await app.rules.set_user_limits("bob", "shell", {"daily": 5}, actor="root")
    await app.rules.remove_user_override("ann", "shell", ["daily"], actor="root")
    await app.rules.reset_usage("ann", None, actor="root")

    audit = (await call(app, "GET", f"{API}/audit?user=ann")).json
    assert [e["action"] for e in audit["items"]] == [
        "usage.reset",
        "limits.remove_override",
        "limits.update",
    ]
    removed, updated = audit["items"][1]["details"], audit["items"][2]["details"]
    assert (updated["before"], updated["after"]) == ({"daily": 800}, {"daily": 800800})
    assert (removed["before"], removed["after"]) == ({"daily": 800800}, {"daily": 800})
    assert audit["total"] == 3
    # A name with LIKE wildcards matches itself only.
    assert (await call(app, "GET", f"{API}/audit?user=a%25")).json["items"] == []
    assert (await call(app, "GET", f"{API}/audit?user=" + "x" * 300)).code == 400


def test_a_migration_numbered_below_the_applied_ones_still_runs(tmp_path, monkeypatch):
    """Branches merge in any order: a database already at 9 still gets a later-merged 7."""
    path = tmp_path / "q.db"
    database = db_module.open_database(f"sqlite:///{path}")
    models.database_proxy.initialize(database)
    try:
        top = migrations.migrate(database)
        assert top >= 9
        # As if step 7 had been merged after the database reached 9: its row is missing.
        database.execute_sql("DELETE FROM schema_version WHERE version = 7")
        ran = []
        patched = tuple((n, ran.append if n == 7 else f) for n, f in migrations.MIGRATIONS)
        monkeypatch.setattr(migrations, "MIGRATIONS", patched)
        assert migrations.migrate(database) == top
        assert migrations.migrate(database) == top
        assert ran == [database]  # once
    finally:
        database.close()
    tables = {r[0] for r in sqlite3.connect(path).execute("SELECT name FROM sqlite_master")}
    assert {"load_refusal_minute", "load_refusal_day"} <= tables


@pytest.mark.gen_test(timeout=60)
async def test_alerts_filter_by_user(app_factory):
    app = await app_factory()
    await app.rules.set_global_limits("shell", {"daily": 0}, actor="t")
    for name in ("ann", "bob"):
        for _ in range(5):  # the alert engine's quota_violation rule fires at 5 a day
            assert (await consume(app, name)).code == 429
    await settle(app)
    both = (await call(app, "GET", f"{API}/alerts")).json
    assert {a["username"] for a in both["items"]} == {"ann", "bob"}
    only = (await call(app, "GET", f"{API}/alerts?user=ann")).json
    assert only["items"] and {a["username"] for a in only["items"]} == {"ann"}
    assert only["total"] == len(only["items"])
    assert (await call(app, "GET", f"{API}/alerts?user=nobody")).json["items"] == []


@pytest.mark.gen_test(timeout=60)
async def test_users_sort_by_violations_today_lists_the_worst_first(app_factory):
    app = await app_factory(plugins={"alert_engine": {"enabled": False}})
    await app.rules.set_global_limits("shell", {"daily": 0}, actor="t")
    for name, n in (("dave", 3), ("mallory", 5), ("carol", 3), ("quiet", 0)):
        for _ in range(n):
            assert (await consume(app, name)).code == 429
    await app.rules.set_global_limits("shell", {"daily": 10}, actor="t")
    assert (await consume(app, "quiet")).code == 200
    resp = (await call(app, "GET", f"{API}/users?sort=violations&per_page=2")).json
    # Most violations first, then by name; only users with violations today.
    assert [(u["username"], u["violations_today"]) for u in resp["items"]] == [
        ("mallory", 5),
        ("carol", 3),
    ]
    assert (resp["total"], resp["pages"], resp["next_cursor"]) == (3, 2, None)
    assert resp["risk_levels"] == [["critical", 95.0], ["high", 90.0], ["elevated", 80.0]]
    second = (await call(app, "GET", f"{API}/users?sort=violations&per_page=2&page=2")).json
    assert [u["username"] for u in second["items"]] == ["dave"]
    found = (await call(app, "GET", f"{API}/users?sort=violations&q=da")).json
    assert [u["username"] for u in found["items"]] == ["dave"] and found["total"] == 1
    bad = await call(app, "GET", f"{API}/users?sort=violations&cursor=abc")
    assert bad.code == 400 and bad.json["error"]["code"] == "invalid_parameter"


@pytest.mark.gen_test(timeout=60)
async def test_users_sort_by_refused_for_load_lists_the_most_refused_first(app_factory):
    app = await app_factory(throttle__cpu_bands=[[90, 0.0]])
    for name in ("ann", "bob", "cy", "calm"):
        assert (await consume(app, name)).code == 200  # known users: their refusals count
    app.load.update(95, 10)  # the factor drops to 0: every consume is refused for load
    for name, n in (("cy", 3), ("bob", 1), ("ann", 3)):
        for _ in range(n):
            assert (await consume(app, name)).code == 503
    resp = (await call(app, "GET", f"{API}/users?sort=refused&per_page=2")).json
    assert [(u["username"], u["load_refusals_today"]) for u in resp["items"]] == [
        ("ann", 3),
        ("cy", 3),
    ]  # most first, then by name; calm was never refused and is not listed
    assert (resp["total"], resp["pages"], resp["next_cursor"]) == (3, 2, None)
    second = (await call(app, "GET", f"{API}/users?sort=refused&per_page=2&page=2")).json
    assert [u["username"] for u in second["items"]] == ["bob"]
    found = (await call(app, "GET", f"{API}/users?sort=refused&q=c")).json
    assert [u["username"] for u in found["items"]] == ["cy"] and found["total"] == 1
    bad = await call(app, "GET", f"{API}/users?sort=refused&cursor=abc")
    assert bad.code == 400 and bad.json["error"]["code"] == "invalid_parameter"


@pytest.mark.gen_test(timeout=60)
async def test_csv_exports_match_the_api_with_the_same_filters(app_factory, monkeypatch):
    monkeypatch.setattr(csv_export, "PAGE", 2)  # several pages with a handful of rows
    app = await app_factory(plugins={"alert_engine": {"enabled": False}})
    await app.rules.set_global_limits("shell", {"daily": 2}, actor="t")
    names = ["ann", "bob", "=cmd|calc", "dora", "eve"]
    for name in names:
        for _ in range(3 if name != "eve" else 1):
            await consume(app, name)
    await consume(app, "bob", "code")

    for query in ("", "?sort=utilization", "?q=b", "?sort=violations", "?sort=refused"):
        api = (
            await call(app, "GET", f"{API}/users{query}{'&' if query else '?'}per_page=100")
        ).json
        resp = await call(app, "GET", f"{API}/users.csv{query}")
        assert resp.code == 200 and resp.headers["Content-Type"].startswith("text/csv")
        assert "attachment" in resp.headers["Content-Disposition"]
        rows = list(csv.reader(io.StringIO(resp.body.decode())))
        types = api["command_types"]
        assert rows[0] == csv_export.user_header(types)
        expected = [
            [str(csv_export.cell(v)) for v in csv_export.user_row(item, types)]
            for item in api["items"]
        ]
        assert rows[1:] == expected, query
    # A name a spreadsheet would run as a formula is quoted.
    everyone = (await call(app, "GET", f"{API}/users.csv")).body.decode()
    assert "'=cmd|calc" in everyone and "\n=cmd" not in everyone

    for query in ("", "?user=bob", "?command_type=code", "?user=bob&command_type=shell"):
        api = (
            await call(app, "GET", f"{API}/violations{query}{'&' if query else '?'}per_page=100")
        ).json
        rows = list(
            csv.reader(
                io.StringIO((await call(app, "GET", f"{API}/violations.csv{query}")).body.decode())
            )
        )
        assert rows[0] == csv_export.VIOLATION_HEADER
        assert [int(r[0]) for r in rows[1:]] == [v["id"] for v in api["items"]], query
        assert len(rows) - 1 == api["total"]
    bad = await call(app, "GET", f"{API}/violations.csv?command_type=nope")
    assert bad.code == 400 and bad.json["error"]["code"] == "invalid_parameter"


@pytest.mark.gen_test(timeout=60)
async def test_history_in_larger_buckets_sums_the_minutes(app_factory):
    app = await app_factory(plugins={"alert_engine": {"enabled": False}}, **REFUSING)
    await app.rules.set_global_limits("shell", {"daily": 2}, actor="t")
    for _ in range(3):
        await consume(app, "ann")
    app.load.update(99.5, 10.0)
    await consume(app, "ann")
    app.load.update(10.0, 10.0)
    await settle(app)
    for minutes, bucket, count in ((60, 60, 60), (1440, 600, 144), (43200, 86400, 30)):
        h = (await call(app, "GET", f"{API}/history?minutes={minutes}&bucket={bucket}")).json
        points = h["activity"]
        assert (h["bucket"], len(points)) == (bucket, count)
        assert [p["t"] % bucket for p in points] == [0] * count
        assert sum(p["commands"] for p in points) == 2
        assert sum(p["violations"] for p in points) == 1
        assert sum(p["refused"] for p in points) == 1
        assert [bool(p.get("partial")) for p in points] == [False] * (count - 1) + [True]
    for query in ("minutes=90&bucket=3600", "minutes=2880", "bucket=7", "minutes=43201"):
        bad = await call(app, "GET", f"{API}/history?{query}")
        assert bad.code == 400 and bad.json["error"]["code"] == "invalid_parameter", query
