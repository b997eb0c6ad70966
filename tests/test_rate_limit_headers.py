"""RateLimit-Policy / RateLimit (draft-ietf-httpapi-ratelimit-headers-09+) and the old trio,
checked against the body of the same response, and the name rules (one user per name)."""

from __future__ import annotations

import re
import unicodedata
from datetime import UTC, datetime

import pytest
from clients import SERVICE, call, consume
from conftest import FakeClock

from quotaserver.models import User

ITEM = re.compile(r'^"(?P<name>[a-z]+)";(?P<params>[a-z]+=\d+(;[a-z]+=\d+)*)$')


def parse_list(value: str) -> dict[str, dict[str, int]]:
    """A structured-field list of strings with integer parameters, strictly."""
    items = {}
    for member in value.split(", "):
        match = ITEM.match(member)
        assert match, f"not a structured-field item: {member!r}"
        params = dict(p.split("=") for p in match["params"].split(";"))
        items[match["name"]] = {k: int(v) for k, v in params.items()}
    return items


def seconds_until(resets_at: str, now: datetime) -> int:
    return int((datetime.fromisoformat(resets_at) - now).total_seconds())


@pytest.mark.gen_test
async def test_headers_match_the_body_window_by_window(app_factory):
    now = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)  # a Tuesday, noon
    app = await app_factory(clock=FakeClock(now))
    await app.rules.set_global_limits("code", {"daily": 10, "weekly": 12, "monthly": 100}, "t")
    assert (await consume(app, "ann", "code", 2)).code == 200
    # Yesterday's use is not in today's window: the weekly one is now the tightest.
    await app.rules.set_global_limits("code", {"daily": 10, "weekly": 5, "monthly": 100}, "t")
    resp = await consume(app, "ann", "code", 1)
    assert resp.code == 200
    periods = resp.json["periods"]
    policy = parse_list(resp.headers["RateLimit-Policy"])
    assert policy == {
        "daily": {"q": 10, "w": 86400},
        "weekly": {"q": 5, "w": 7 * 86400},
        "monthly": {"q": 100, "w": 31 * 86400},  # March
    }
    for period, item in policy.items():
        assert item["q"] == periods[period]["limit"]
    current = parse_list(resp.headers["RateLimit"])
    smallest = min(periods, key=lambda p: periods[p]["remaining"])
    assert smallest == "weekly"
    assert current == {
        "weekly": {
            "r": periods["weekly"]["remaining"],
            "t": seconds_until(periods["weekly"]["resets_at"], now),
        }
    }
    assert current["weekly"]["r"] == 2
    # The deprecated trio says the same, for the same window.
    assert resp.headers["RateLimit-Limit"] == "5"
    assert resp.headers["RateLimit-Remaining"] == "2"
    assert resp.headers["RateLimit-Reset"] == str(current["weekly"]["t"])


@pytest.mark.gen_test
async def test_a_429_names_the_refusing_window_and_retry_after_waits_for_its_reset(app_factory):
    now = datetime(2026, 3, 10, 18, 0, tzinfo=UTC)
    app = await app_factory(clock=FakeClock(now))
    await app.rules.set_global_limits("test", {"daily": 50, "weekly": 3}, "t")
    assert (await consume(app, "bo", "test", 3)).code == 200
    resp = await consume(app, "bo", "test", 1)
    assert resp.code == 429 and resp.json["violation"]["period"] == "weekly"
    weekly = resp.json["periods"]["weekly"]
    reset = seconds_until(weekly["resets_at"], now)
    assert parse_list(resp.headers["RateLimit"]) == {"weekly": {"r": 0, "t": reset}}
    assert int(resp.headers["Retry-After"]) == reset  # Monday 00:00: never earlier
    assert "daily" in parse_list(resp.headers["RateLimit-Policy"])
    # The same on check, which counts nothing.
    body = {"user": "bo", "command_type": "test"}
    check = await call(app, "POST", "/api/quotas/check", body, token=SERVICE)
    assert check.code == 429 and check.headers["RateLimit"] == resp.headers["RateLimit"]


@pytest.mark.gen_test
async def test_an_unlimited_command_has_no_rate_limit_headers(app_factory):
    app = await app_factory()
    await app.rules.set_global_limits(
        "review", {"daily": None, "weekly": None, "monthly": None}, "t"
    )
    resp = await consume(app, "cy", "review")
    assert resp.code == 200
    assert "RateLimit-Policy" not in resp.headers and "RateLimit" not in resp.headers


@pytest.mark.gen_test
async def test_one_user_per_name_nfc_and_the_refused_names(app_factory):
    app = await app_factory()
    nfd = unicodedata.normalize("NFD", "zo\u00eb")
    assert nfd != "zo\u00eb"
    assert (await consume(app, "zo\u00eb")).json["periods"]["daily"]["used"] == 1
    second = await consume(app, nfd)
    assert second.code == 200 and second.json["user"] == "zo\u00eb"
    assert second.json["periods"]["daily"]["used"] == 2
    status = await call(app, "GET", "/api/quotas/users/zoe%CC%88", token=SERVICE)  # NFD in a URL
    assert status.code == 200 and status.json["user"] == "zo\u00eb"
    # The admin API's searches and filters normalise the same way.
    found = await call(app, "GET", "/api/admin/quotas/users?q=zoe%CC%88")
    assert [u["username"] for u in found.json["items"]] == ["zo\u00eb"]
    admin = await call(app, "GET", "/api/admin/quotas/users/zoe%CC%88")
    assert admin.code == 200
    for bad in ("alice ", " alice", "\u00a0alice", ".", "..", "x" + "\u0301" * 5):
        resp = await consume(app, bad)
        assert resp.code == 400, (bad, resp)
        assert resp.json["error"]["code"] == "invalid_field"
    # Four marks in a row are still a name; "a.b" and "..." too.
    for fine in ("x\u0301\u0302\u0303\u0304", "a.b", "..."):
        assert (await consume(app, fine)).code == 200, fine
    names = await app.store.run(lambda: sorted(u.username for u in User.select()))
    assert names == sorted(["zo\u00eb", "x\u0301\u0302\u0303\u0304", "a.b", "..."])
