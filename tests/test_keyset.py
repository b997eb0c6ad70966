"""Every admin list pages by cursor: each row exactly once while rows are added and changed.

A deterministic interleaving: between every two pages new rows are written (violations,
audit entries, alerts) and existing ones change (alerts acknowledged, limits edited), and
the rows that existed when paging started must each come back exactly once, newest first.
"""

from __future__ import annotations

import pytest
from clients import call, consume, settle

from quotaserver.models import Alert, AuditLog, Event, Violation

API = "/api/admin/quotas"


async def _ids(app, model) -> list[int]:
    return await app.store.read(lambda: [r.id for r in model.select(model.id)])


async def _page_all(app, path: str, between, per_page: int = 4) -> list[dict]:
    """Follow next_cursor to the end, calling ``between(n)`` after each page."""
    items: list[dict] = []
    sep = "&" if "?" in path else "?"
    resp = await call(app, "GET", f"{path}{sep}per_page={per_page}")
    n = 0
    while True:
        assert resp.code == 200, resp.json
        items += resp.json["items"]
        cursor = resp.json["next_cursor"]
        if cursor is None:
            return items
        n += 1
        await between(n)
        resp = await call(app, "GET", f"{path}{sep}per_page={per_page}&cursor={cursor}")


@pytest.mark.gen_test(timeout=60)
async def test_violations_and_audit_page_exactly_once_while_rows_are_added(app_factory):
    app = await app_factory(dev=True)
    for i in range(13):
        await app.quota.record_violation(f"u{i % 4}", "shell", "daily")
        await app.rules.set_user_limits(f"u{i % 4}", "code", {"daily": 100 + i}, actor="ops")
    violations_before = await _ids(app, Violation)

    async def churn(n: int) -> None:
        # New rows at the head of both lists, and changes to rows already listed.
        await app.quota.record_violation(f"new{n}", "code", "daily")
        await app.rules.set_user_limits("u1", "code", {"daily": 200 + n}, actor="ops")
        await consume(app, "u2", "shell", 1)

    listed = await _page_all(app, f"{API}/violations", churn)
    ids = [v["id"] for v in listed]
    assert len(ids) == len(set(ids)), "a violation was listed twice"
    assert ids == sorted(ids, reverse=True)
    assert set(violations_before) <= set(ids)
    assert ids[: len(violations_before)] == sorted(violations_before, reverse=True)

    audit_before = await _ids(app, AuditLog)
    listed = await _page_all(app, f"{API}/audit", churn, per_page=5)
    ids = [a["id"] for a in listed]
    assert len(ids) == len(set(ids)), "an audit entry was listed twice"
    assert ids == sorted(ids, reverse=True) == sorted(audit_before, reverse=True)

    # Filters keep their meaning across pages.
    listed = await _page_all(app, f"{API}/violations?user=u3", churn, per_page=1)
    assert [v["username"] for v in listed] == ["u3"] * 3


@pytest.mark.gen_test(timeout=60)
async def test_alerts_overrides_and_events_page_by_cursor(app_factory):
    rules = {"quota_violation": {"threshold": 1, "severity": "high"}}
    app = await app_factory(dev=True, plugins={"alert_engine": {"rules": rules}})
    for i in range(9):
        await app.rules.set_user_limits(f"user{i}", "shell", {"daily": 10 + i}, actor="ops")
    for i in range(9):
        await app.quota.record_violation(f"user{i}", "shell", "daily")
    await settle(app)
    alerts_before = await _ids(app, Alert)
    assert len(alerts_before) >= 5
    changed: list[int] = []

    async def ack_one(n: int) -> None:
        # Acknowledging an alert moves it to the top of "most recently changed first".
        target = sorted(alerts_before)[n - 1]
        resp = await call(app, "POST", f"{API}/alerts/{target}/acknowledge", {})
        assert resp.code == 200, resp.json
        changed.append(target)

    alerts = await _page_all(app, f"{API}/alerts", ack_one, per_page=2)
    listed = [a["alert_id"] for a in alerts]
    assert len(listed) == len(set(listed)), "an alert was listed twice"
    unchanged = set(alerts_before) - set(changed)
    assert unchanged <= set(listed)

    async def add_override(n: int) -> None:
        await app.rules.set_user_limits(f"late{n}", "code", {"daily": n}, actor="ops")

    overrides = await _page_all(app, f"{API}/overrides", add_override, per_page=2)
    keys = [(o["username"], o["command_type"], o["period"]) for o in overrides]
    assert len(keys) == len(set(keys))
    assert {(f"user{i}", "shell", "daily") for i in range(9)} <= set(keys)

    events_before = await _ids(app, Event)

    async def nothing(n: int) -> None:
        await app.quota.record_violation("late", "shell", "daily")

    resp = await call(app, "GET", f"{API}/events?limit=3")
    seqs: list[int] = []
    while True:
        assert resp.code == 200, resp.json
        seqs += [e["seq"] for e in resp.json["items"]]
        if resp.json["next_cursor"] is None:
            break
        await nothing(0)
        resp = await call(app, "GET", f"{API}/events?limit=3&cursor={resp.json['next_cursor']}")
    assert seqs == sorted(set(seqs), reverse=True)
    assert set(events_before) <= set(seqs)


@pytest.mark.gen_test(timeout=30)
@pytest.mark.parametrize(
    "path",
    ["violations", "audit", "alerts", "overrides", "events", "users"],
)
async def test_a_cursor_the_server_did_not_issue_is_a_400(app_factory, path):
    app = await app_factory()
    for bad in ("nonsense", "eyJpZCI6ICJ4In0", "eyJpZCI6OTk5OTk5OTk5OTk5OTk5OTk5OTk5fQ", "e30"):
        resp = await call(app, "GET", f"{API}/{path}?cursor={bad}")
        assert resp.code == 400, (path, bad, resp.code)
        assert resp.json["error"]["code"] == "invalid_parameter"
