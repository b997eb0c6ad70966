"""``make run``'s demo traffic: simulated users through the real HTTP quota API."""

from __future__ import annotations

import pytest
from clients import settle
from waits import wait_until

from quotaserver.demo import HEAVY, USERS, DemoTraffic


@pytest.mark.gen_test(timeout=60)
async def test_demo_traffic_consumes_over_http_and_gives_heavy_users_small_limits(app_factory):
    app = await app_factory()
    demo = DemoTraffic(app, rate=200.0, seed=7)
    await demo.start()
    try:
        await wait_until(lambda: demo.sent >= 30, "thirty demo requests")
    finally:
        await demo.stop()
    overrides = (await app.rules.list_rules())["overrides"]
    assert {name: overrides[name]["shell"]["daily"] for name in HEAVY} == dict.fromkeys(HEAVY, 40)
    await settle(app)  # the analytics plugin counts in the background
    stats = app.stats_snapshot()
    assert stats["commands_today"] >= 30  # every demo request counts at least 1
    assert 1 <= stats["total_users"] <= len(USERS)
    sent = demo.sent
    assert demo._task.done()  # stopped: no more requests
    assert demo.sent == sent
