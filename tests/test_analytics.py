"""Quota analytics: incremental stats figures, rebuilt from the database at start-up."""

import pytest
from clients import consume, settle


@pytest.mark.gen_test(timeout=30)
async def test_figures_follow_decisions_admin_changes_and_restarts(app_factory):
    app = await app_factory(plugins={"alert_engine": {"enabled": False}})
    await app.rules.set_global_limits("code", {"daily": 10}, actor="t")
    await consume(app, "ann", "code", 5)
    await consume(app, "bob", "code", 3)
    await consume(app, "bob", "code", 9)  # refused
    await settle(app)
    stats = app.stats_snapshot()
    assert (stats["total_users"], stats["active_users_today"]) == (2, 2)
    assert (stats["commands_today"], stats["violations_today"]) == (8, 1)
    assert stats["high_utilization_count"] == 0
    assert stats["average_throttle_factor"] == 1.0

    # Lowering a limit makes ann (5 of 6) a high-utilisation user; nothing is counted twice.
    await app.rules.set_user_limits("ann", "code", {"daily": 6}, actor="t")
    await settle(app)
    stats = app.stats_snapshot()
    assert stats["high_utilization_count"] == 1
    assert stats["commands_today"] == 8

    # A usage reset does not un-admit today's commands, but ann is no longer near a limit.
    await app.rules.reset_usage("ann", None, actor="t")
    await settle(app)
    stats = app.stats_snapshot()
    assert (stats["commands_today"], stats["high_utilization_count"]) == (8, 0)

    await app.stop()
    again = await app_factory(plugins={"alert_engine": {"enabled": False}})
    stats = again.stats_snapshot()
    assert (stats["total_users"], stats["active_users_today"]) == (2, 1)  # ann was reset
    assert (stats["commands_today"], stats["violations_today"]) == (8, 1)
