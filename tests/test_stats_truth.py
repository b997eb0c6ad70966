"""Live stats equal a recount from the database after a mixed workload (issue 10, item 3).

Users and violations are created by every path there is: consumes (some concurrent), the
admin API, the development endpoints, and a plugin recording a violation itself.
"""

from __future__ import annotations

import asyncio
import textwrap

import pytest
from clients import call, consume, settle
from conftest import FakeClock
from peewee import fn
from waits import wait_until

from quotaserver.models import Activity, Usage, User, Violation

PLUGIN = textwrap.dedent(
    '''
    """A third-party style plugin that records violations of its own."""
    from quotaserver import hookimpl
    from quotaserver.realtime.emitters import PeriodicEmitter


    @hookimpl
    def register_emitters(app):
        state = app.plugin_state("violator")

        async def collect():
            if not state.get("done"):
                state["done"] = True
                await app.quota.record_violation("frank", "code", "daily")
                await app.quota.record_violation("bob", "shell", "daily")

        return [PeriodicEmitter("violator", 3600, collect)]
    '''
)


def recount(today_start) -> dict:
    """The stats figures, counted from the tables."""
    from datetime import UTC

    start = today_start.astimezone(UTC).replace(tzinfo=None)
    key = int(today_start.timestamp())
    commands = Activity.select(fn.SUM(Activity.commands)).where(Activity.minute >= key).scalar()
    active = (
        Usage.select(fn.COUNT(Usage.user.distinct()))
        .where((Usage.period == "daily") & (Usage.window_start == key) & (Usage.used > 0))
        .scalar()
    )
    return {
        "total_users": User.select().count(),
        "violations_today": Violation.select().where(Violation.created_at >= start).count(),
        "commands_today": int(commands or 0),
        "active_users_today": active,
    }


@pytest.mark.gen_test(timeout=60)
async def test_live_stats_equal_a_database_recount_after_a_mixed_workload(app_factory, tmp_path):
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "violator.py").write_text(PLUGIN)
    clock = FakeClock()
    app = await app_factory(clock=clock, dev=True, plugins_dir=str(plugin_dir))
    await app.rules.set_global_limits("shell", {"daily": 5}, "test")

    # Concurrent consumes: new users, admissions and refusals interleaved.
    codes = await asyncio.gather(
        *[consume(app, "alice") for _ in range(8)],
        *[consume(app, "bob") for _ in range(2)],
        *[consume(app, f"user{i}", "code", 2) for i in range(6)],
    )
    assert sorted(r.code for r in codes).count(429) == 3
    # The admin API creates a user with an override (no usage).
    resp = await call(
        app, "PUT", "/api/admin/quotas/users/dave/limits/shell", {"limits": {"daily": 9}}
    )
    assert resp.code == 200, resp
    # The development endpoint: a new user and an existing one.
    for user in ("eve", "alice"):
        resp = await call(app, "POST", "/api/ws/test-violation", {"user": user})
        assert resp.code == 200, resp
    # The plugin's violations ran at start-up; wait for them to be stored.
    await wait_until(lambda: app.plugin_state("violator").get("done"), "the plugin's run")
    await _until_stats(app, lambda s: s["total_users"] == 11)

    await settle(app)
    live = (await call(app, "GET", "/api/admin/quotas/stats")).json["stats"]
    today = app.quota.calendar.window("daily", clock()).start
    expected = await app.store.run(recount, today)
    assert expected == {
        "total_users": 11,  # alice bob user0-5 dave eve frank
        "violations_today": 7,  # 3 consumes, 2 dev, 2 plugin
        "commands_today": 5 + 2 + 12,
        "active_users_today": 8,
    }
    assert {k: live[k] for k in expected} == expected


async def _until_stats(app, condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        await settle(app)
        stats = (await call(app, "GET", "/api/admin/quotas/stats")).json["stats"]
        if condition(stats):
            return
        assert asyncio.get_running_loop().time() < deadline, f"stats never matched: {stats}"
        await asyncio.sleep(0.05)
