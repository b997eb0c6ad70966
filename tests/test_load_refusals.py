"""Consumes refused for load (throttle factor 0): counted in the stats, per minute in the
history, per user today in the users list and the user's detail; kept across a restart; and
the audit log's before/after of limit changes (issue 25)."""

import sqlite3

import pytest
from clients import call, consume, settle

from quotaserver import db as db_module
from quotaserver import models

API = "/api/admin/quotas"


@pytest.mark.gen_test(timeout=60)
async def test_load_refusals_are_counted_per_minute_per_user_and_survive_a_restart(app_factory):
    app = await app_factory(plugins={"alert_engine": {"enabled": False}})
    await app.rules.set_global_limits("shell", {"daily": 2}, actor="t")
    assert [(await consume(app, "ann")).code for _ in range(3)] == [200, 200, 429]
    app.load.update(99.5, 10.0)  # the top CPU band: factor 0
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
    """Branches merge in any order: a database already at 9 still gets a later-merged 5."""
    path = tmp_path / "q.db"
    database = db_module.open_database(f"sqlite:///{path}")
    models.database_proxy.initialize(database)
    try:
        top = db_module.migrate(database)
        assert top >= 9
        ran = []
        monkeypatch.setattr(db_module, "MIGRATIONS", (*db_module.MIGRATIONS, (5, ran.append)))
        assert db_module.migrate(database) == top
        assert db_module.migrate(database) == top
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
