"""Alert rules (from the config) with deduplication; acknowledge and resolve; alerts that
end by themselves when their condition clears."""

import pytest
from clients import consume, settle, ws_connect
from conftest import FakeClock

from quotaserver.models import Alert, AuditLog

ONLY_VIOLATIONS = {
    "alert_engine": {
        "rules": {"high_utilization": {"enabled": False}, "approaching_limit": {"enabled": False}}
    }
}


async def alerts(app):
    return await app.store.run(lambda: list(Alert.select().order_by(Alert.id).dicts()))


@pytest.mark.gen_test(timeout=30)
async def test_quota_violation_rule_opens_one_alert_and_counts_repeats(app_factory):
    app = await app_factory(plugins=ONLY_VIOLATIONS)
    await app.rules.set_global_limits("shell", {"daily": 1}, actor="t")
    ws = await ws_connect(app, "types=alert")
    await consume(app, "ana")
    for _ in range(7):
        await consume(app, "ana")  # 7 violations
        await settle(app)
    rows = [a for a in await alerts(app) if a["rule"] == "quota_violation"]
    assert len(rows) == 1
    assert rows[0]["severity"] == "critical"
    assert rows[0]["count"] == 3  # opened at the 5th violation, repeated at the 6th and 7th
    assert rows[0]["message"] == "Critical: 7 quota violations today"
    first = await ws.recv_type("alert")
    assert first["data"]["update"] is False and first["data"]["count"] == 1
    assert first["data"]["username"] == "ana" and first["data"]["action_needed"]
    second = await ws.recv_type("alert")
    assert second["data"]["alert_id"] == first["data"]["alert_id"]
    assert second["data"]["update"] is True and second["data"]["count"] == 2
    ws.close()


@pytest.mark.gen_test(timeout=30)
async def test_utilization_rules_fire_on_crossing_before_the_violation(app_factory):
    app = await app_factory()
    await app.rules.set_global_limits("code", {"daily": 10}, actor="t")
    await consume(app, "bea", "code", 7)
    await settle(app)
    assert await alerts(app) == []
    await consume(app, "bea", "code", 1)  # 80 %
    await settle(app)
    rows = await alerts(app)
    assert [(a["rule"], a["severity"]) for a in rows] == [("high_utilization", "high")]
    await consume(app, "bea", "code", 1)  # 90 %: approaching the limit, no violation yet
    await settle(app)
    rows = await alerts(app)
    assert [a["rule"] for a in rows] == ["high_utilization", "approaching_limit"]
    assert "90%" in rows[1]["message"]
    await consume(app, "bea", "code", 1)  # 100 %: no new crossing, no new alert
    await settle(app)
    assert len(await alerts(app)) == 2


@pytest.mark.gen_test(timeout=30)
async def test_system_load_rules(app_factory):
    app = await app_factory(
        plugins={"alert_engine": {"rules": {"sustained_throttling": {"duration": 0}}}}
    )
    app.load.update(91, 40)  # factor 0.5: throttled, not below 0.5
    await app.scheduler.run_once("alert_rules")
    assert [a["rule"] for a in await alerts(app)] == ["high_system_load"]
    app.load.update(96, 40)  # factor 0.25 < 0.5
    await app.scheduler.run_once("alert_rules")
    await app.scheduler.run_once("alert_rules")
    rows = await alerts(app)
    assert sorted(a["rule"] for a in rows) == ["high_system_load", "sustained_throttling"]
    assert all(a["count"] == 1 for a in rows)  # once per episode, not every check
    assert rows[0]["severity"] == "critical"


@pytest.mark.gen_test(timeout=30)
async def test_rules_can_be_disabled_and_thresholds_changed(app_factory):
    app = await app_factory(
        plugins={
            "alert_engine": {
                "rules": {
                    "quota_violation": {"threshold": 2, "severity": "high"},
                    "high_utilization": {"enabled": False},
                    "approaching_limit": {"enabled": False},
                }
            }
        }
    )
    await app.rules.set_global_limits("shell", {"daily": 1}, actor="t")
    for _ in range(3):
        await consume(app, "cid")
        await settle(app)
    rows = await alerts(app)
    assert [(a["rule"], a["severity"], a["count"]) for a in rows] == [
        ("quota_violation", "high", 1)
    ]


@pytest.mark.gen_test(timeout=30)
async def test_acknowledge_and_resolve_publish_updates_and_audit(app_factory):
    app = await app_factory()
    ws = await ws_connect(app, "types=alert")
    opened = await app.alerts.raise_alert("manual", "medium", "disk almost full")
    assert (await ws.recv_type("alert"))["data"]["status"] == "open"
    acked = await app.alerts.acknowledge(opened["alert_id"], actor="ops")
    assert acked["status"] == "acknowledged" and acked["acknowledged_by"] == "ops"
    msg = await ws.recv_type("alert")
    assert msg["data"]["status"] == "acknowledged" and msg["data"]["update"] is True
    # A repeat while acknowledged counts on the same alert.
    repeat = await app.alerts.raise_alert("manual", "medium", "disk almost full")
    assert repeat["alert_id"] == opened["alert_id"] and repeat["count"] == 2
    resolved = await app.alerts.resolve(opened["alert_id"], actor="ops")
    assert resolved["status"] == "resolved"
    # After resolution a repeat opens a new alert.
    fresh = await app.alerts.raise_alert("manual", "medium", "disk almost full")
    assert fresh["alert_id"] != opened["alert_id"] and fresh["count"] == 1
    actions = await app.store.run(
        lambda: [(r.actor, r.action) for r in AuditLog.select().order_by(AuditLog.id)]
    )
    assert actions == [("ops", "alert.acknowledge"), ("ops", "alert.resolve")]
    ws.close()


@pytest.mark.gen_test(timeout=30)
async def test_violation_counts_survive_a_restart(app_factory):
    app = await app_factory(plugins=ONLY_VIOLATIONS)
    await app.rules.set_global_limits("shell", {"daily": 1}, actor="t")
    await consume(app, "dov")
    for _ in range(4):
        await consume(app, "dov")
        await settle(app)
    assert await alerts(app) == []
    await app.stop()
    again = await app_factory(plugins=ONLY_VIOLATIONS)
    await consume(again, "dov")  # the 5th violation today, counted from the database
    await settle(again)
    assert [a["rule"] for a in await alerts(again)] == ["quota_violation"]


@pytest.mark.gen_test(timeout=30)
async def test_load_alert_ends_by_itself_after_resolve_after_and_a_recurrence_is_new(
    app_factory,
):
    clock = FakeClock()
    app = await app_factory(clock=clock, alerts__resolve_after=60.0)
    ws = await ws_connect(app, "types=alert")
    app.load.update(91, 40)  # above the 85 % band
    await app.scheduler.run_once("alert_rules")
    opened = (await ws.recv_type("alert"))["data"]
    assert opened["alert_type"] == "high_system_load" and opened["status"] == "open"
    app.load.update(40, 40)  # below the band, but not for resolve_after yet
    await app.scheduler.run_once("alert_rules")
    clock.advance(seconds=59)
    await app.scheduler.run_once("alert_rules")
    assert [a["status"] for a in await alerts(app)] == ["open"]
    clock.advance(seconds=2)
    await app.scheduler.run_once("alert_rules")
    ended = (await ws.recv_type("alert"))["data"]
    assert ended["alert_id"] == opened["alert_id"]
    assert (ended["status"], ended["resolved_by"], ended["update"]) == ("resolved", "system", True)
    app.load.update(95, 40)  # the load comes back the same day: a new alert, not count 2
    await app.scheduler.run_once("alert_rules")
    again = (await ws.recv_type("alert"))["data"]
    assert again["alert_id"] != opened["alert_id"]
    assert (again["status"], again["count"], again["update"]) == ("open", 1, False)
    rows = await alerts(app)
    assert [(a["status"], a["resolved_by"]) for a in rows] == [
        ("resolved", "system"),
        ("open", None),
    ]
    ws.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_dip_shorter_than_resolve_after_keeps_the_episode_open(app_factory):
    clock = FakeClock()
    app = await app_factory(clock=clock, alerts__resolve_after=60.0)
    app.load.update(91, 40)
    await app.scheduler.run_once("alert_rules")
    app.load.update(40, 40)
    await app.scheduler.run_once("alert_rules")
    clock.advance(seconds=50)
    app.load.update(92, 40)  # back above before the minute: the same episode
    await app.scheduler.run_once("alert_rules")
    clock.advance(seconds=20)
    app.load.update(40, 40)
    await app.scheduler.run_once("alert_rules")  # clear again from now on
    clock.advance(seconds=30)
    await app.scheduler.run_once("alert_rules")
    rows = await alerts(app)
    assert [(a["status"], a["count"]) for a in rows] == [("open", 1)]


@pytest.mark.gen_test(timeout=30)
async def test_throttling_alert_ends_when_the_factor_recovers(app_factory):
    clock = FakeClock()
    app = await app_factory(
        clock=clock,
        alerts__resolve_after=0.0,
        plugins={
            "alert_engine": {
                "rules": {"sustained_throttling": {"duration": 0}, "high_system_load": {}}
            }
        },
    )
    app.load.update(96, 40)  # factor 0.3
    await app.scheduler.run_once("alert_rules")
    app.load.update(10, 10)  # factor 1
    await app.scheduler.run_once("alert_rules")
    rows = await alerts(app)
    assert sorted((a["rule"], a["status"], a["resolved_by"]) for a in rows) == [
        ("high_system_load", "resolved", "system"),
        ("sustained_throttling", "resolved", "system"),
    ]


@pytest.mark.gen_test(timeout=30)
async def test_utilization_alert_ends_when_the_limit_is_raised_above_usage(app_factory):
    app = await app_factory()
    await app.rules.set_global_limits("code", {"daily": 10}, actor="t")
    await consume(app, "eve", "code", 8)  # 80 %
    await settle(app)
    assert [(a["rule"], a["status"]) for a in await alerts(app)] == [("high_utilization", "open")]
    await app.rules.set_global_limits("code", {"daily": 9}, actor="t")  # 89 %: still high
    await settle(app)
    assert [a["status"] for a in await alerts(app)] == ["open"]
    await app.rules.set_global_limits("code", {"daily": 100}, actor="t")  # 8 %
    await settle(app)
    rows = await alerts(app)
    assert [(a["rule"], a["status"], a["resolved_by"]) for a in rows] == [
        ("high_utilization", "resolved", "system")
    ]


@pytest.mark.gen_test(timeout=30)
async def test_utilization_alert_ends_when_the_usage_is_reset(app_factory):
    app = await app_factory()
    await app.rules.set_global_limits("code", {"daily": 10}, actor="t")
    await consume(app, "gus", "code", 8)
    await consume(app, "hal", "code", 8)
    await settle(app)
    assert [a["status"] for a in await alerts(app)] == ["open", "open"]
    await app.rules.reset_usage("gus", None, actor="t")
    await settle(app)
    rows = await alerts(app)  # by id: gus's alert, then hal's (still at 80 %)
    assert [(a["status"], a["resolved_by"]) for a in rows] == [
        ("resolved", "system"),
        ("open", None),
    ]


@pytest.mark.gen_test(timeout=30)
async def test_daily_alerts_end_at_a_new_day(app_factory):
    clock = FakeClock()
    app = await app_factory(
        clock=clock,
        plugins={
            "alert_engine": {
                **ONLY_VIOLATIONS["alert_engine"],
                "rules": {
                    **ONLY_VIOLATIONS["alert_engine"]["rules"],
                    "quota_violation": {"threshold": 1},
                },
            }
        },
    )
    await app.rules.set_global_limits("shell", {"daily": 1}, actor="t")
    await consume(app, "fay")
    await consume(app, "fay")  # a violation: the alert opens
    await settle(app)
    assert [a["status"] for a in await alerts(app)] == ["open"]
    await app.scheduler.run_once("alert_rules")  # the same day: nothing ends
    assert [a["status"] for a in await alerts(app)] == ["open"]
    clock.advance(days=1)
    await app.scheduler.run_once("alert_rules")
    rows = await alerts(app)
    assert [(a["rule"], a["status"], a["resolved_by"]) for a in rows] == [
        ("quota_violation", "resolved", "system")
    ]


@pytest.mark.gen_test(timeout=30)
async def test_reloaded_rules_apply_at_once_and_keep_the_day_in_progress(app_factory):
    from quotaserver.builtin_plugins import alert_engine

    app = await app_factory(
        plugins={"alert_engine": {"rules": {"quota_violation": {"threshold": 5}}}}
    )
    engine = alert_engine._engine(app)
    engine.violations[7] = 3  # today's count so far
    reloaded = app.config.with_overrides()
    reloaded.plugins = {"alert_engine": {"rules": {"quota_violation": {"threshold": 2}}}}
    await app.hooks.call_async("config_reloaded", app=app, config=reloaded)
    assert alert_engine._engine(app) is engine
    assert engine.rule("quota_violation")["threshold"] == 2
    assert engine.violations[7] == 3
