"""Quota analytics: incremental stats figures, rebuilt from the database at start-up."""

import pytest
from clients import call, consume, settle, ws_connect
from plugin_files import plugin_dir

from quotaserver.plugins import PluginError


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


@pytest.mark.gen_test(timeout=30)
async def test_admitted_commands_reach_dashboards_as_one_coalesced_live_usage_event(app_factory):
    app = await app_factory(plugins={"alert_engine": {"enabled": False}})
    await app.rules.set_global_limits("code", {"daily": 10}, actor="t")
    ws = await ws_connect(app, "types=usage")
    for _ in range(3):
        await consume(app, "ann", "code", 2)
    await consume(app, "bob", "shell", 1)
    await consume(app, "bob", "code", 10)  # refused: no usage change
    message = await ws.recv_type("usage")
    assert "seq" not in message  # live only, never replayed
    rows = {(r["username"], r["command_type"]): r for r in message["data"]["users"]}
    # The newest figures per (user, command type), in one event.
    assert rows[("ann", "code")] == {
        "user_id": rows[("ann", "code")]["user_id"],
        "username": "ann",
        "command_type": "code",
        "used": 6,
        "limit": 10,
        "percent": 60.0,
    }
    assert rows[("bob", "shell")]["used"] == 1
    assert message["data"]["truncated"] is False
    ws.close()


BUILT_INS_OFF = {
    name: {"enabled": False}
    for name in ("quota_analytics", "system_metrics", "alert_engine", "notify", "disk_usage")
}


@pytest.mark.gen_test(timeout=30)
async def test_the_core_figures_stay_with_every_plugin_disabled(app_factory):
    """The load and throttle factor are the core's: without the analytics plugin the
    snapshot still carries them; the plugin's figures go with it."""
    app = await app_factory(plugins=BUILT_INS_OFF, throttle__cpu_bands=[[50, 0.5]])
    app.load.update(60, 20)
    stats = (await call(app, "GET", "/api/admin/quotas/stats")).json["stats"]
    assert stats == {
        "system_load": {
            "instance": app.instance_name,
            "cpu_percent": 60.0,
            "memory_percent": 20.0,
            "throttle_factor": 0.5,
            "throttle_active": True,
        },
        "database_available": True,
    }
    app.broadcast_stats()  # what the next stats tick sends
    ws = await ws_connect(app)
    assert (await ws.recv_type("stats"))["data"]["system_load"]["throttle_factor"] == 0.5
    ws.close()


@pytest.mark.gen_test(timeout=30)
async def test_a_plugin_cannot_claim_a_core_stats_field(app_factory, tmp_path):
    claim = (
        "from quotaserver import hookimpl\n\n"
        "@hookimpl\n"
        "def stats_fields(app):\n"
        "    return {'system_load': {'cpu_percent': 0}}\n"
    )
    with pytest.raises(PluginError, match="'system_load' is claimed by plugins fake_load and quo"):
        await app_factory(plugins_dir=plugin_dir(tmp_path, fake_load=claim))
