"""Limit precedence has one owner (quotaserver.limits): the hot path's single-user
resolution and the bulk Rules of the admin queries and analytics agree."""

import pytest

from quotaserver.limits import Rules, effective_limits, pick
from quotaserver.models import GLOBAL_SCOPE


def test_pick_and_effective_limits():
    assert pick({"daily": None}, {"daily": 5}, "daily") is None  # an unlimited override wins
    assert pick({}, {"daily": 5}, "daily") == 5
    assert pick({}, {}, "daily") is None
    rows = [
        ("7", "daily", 3),
        (GLOBAL_SCOPE, "daily", 10),
        (GLOBAL_SCOPE, "hourly", 2),
        (GLOBAL_SCOPE, "yearly", 1),  # untracked: ignored
        (None, None, None),  # an empty joined row: ignored
    ]
    assert effective_limits(rows, ("hourly", "daily", "weekly")) == {
        "hourly": 2,
        "daily": 3,
        "weekly": None,
    }


@pytest.mark.gen_test
async def test_hot_path_and_bulk_rules_agree(app_factory):
    app = await app_factory(plugins={"alert_engine": {"enabled": False}})
    await app.rules.set_global_limits("shell", {"daily": 10, "weekly": 4}, actor="t")
    await app.rules.set_user_limits("alice", "shell", {"daily": 3, "weekly": None}, actor="t")
    await app.rules.set_user_limits("bob", "shell", {"monthly": 7}, actor="t")
    quota = app.quota

    def both(username: str) -> tuple[dict, dict]:
        user_id = quota.sql.user_id(username)
        hot = quota.limits_for(user_id, "shell")
        rules = Rules([user_id])
        bulk = {p: rules.limit(user_id, "shell", p) for p in quota.periods}
        return hot, bulk

    for name in ("alice", "bob"):
        hot, bulk = await app.store.read(both, name)
        assert hot == bulk, name
    hot, _ = await app.store.read(both, "alice")
    assert hot["daily"] == 3 and hot["weekly"] is None
