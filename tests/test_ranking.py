"""The users list at scale: maintained peaks equal a recount; cursors page exactly once."""

from __future__ import annotations

import random

import pytest
from clients import ADMIN, call, consume
from conftest import FakeClock

from quotaserver.models import DailyPeak

API = "/api/admin/quotas"
TYPES = ("shell", "code", "test")


async def _recount(app) -> dict[str, float | None]:
    """Each active user's peak, read through the user-detail endpoint (another code path)."""
    peaks: dict[str, float | None] = {}
    cursor = None
    while True:
        query = f"{API}/users?per_page=200" + (f"&cursor={cursor}" if cursor else "")
        body = (await call(app, "GET", query, token=ADMIN)).json
        for item in body["items"]:
            detail = (await call(app, "GET", f"{API}/users/{item['username']}")).json
            daily = [
                detail["limits"][t]["daily"]
                for t in detail["limits"]
                if detail["limits"][t]["daily"]["used"] > 0
            ]
            if not daily:
                continue
            limited = [d["percent"] for d in daily if d["percent"] is not None]
            peaks[item["username"]] = max(limited) if limited else None
        cursor = body["next_cursor"]
        if cursor is None:
            return peaks


async def _maintained(app) -> dict[str, float | None]:
    day = app.quota.calendar.window("daily", app.clock()).key

    def rows():
        return list(DailyPeak.select().where(DailyPeak.day == day).tuples())

    return {
        username: (None if rank == 1.0 else -rank)
        for _user, _day, rank, username in await app.store.read(rows)
    }


@pytest.mark.gen_test(timeout=120)
async def test_maintained_peaks_equal_a_recount_after_a_mixed_workload(app_factory):
    app = await app_factory(clock=FakeClock())
    rng = random.Random(7)
    users = [f"user{i:02d}" for i in range(30)]
    await app.rules.set_global_limits("shell", {"daily": 50}, actor="t")
    await app.rules.set_global_limits("test", {"daily": None}, actor="t")  # unlimited
    for step in range(300):
        user, kind = rng.choice(users), rng.choice(TYPES)
        await consume(app, user, kind, rng.randint(1, 6))
        if step % 40 == 10:  # a global default changes: every user of that type moves
            await app.rules.set_global_limits(kind, {"daily": rng.randint(20, 200)}, actor="t")
        if step % 50 == 20:
            await app.rules.set_user_limits(user, "shell", {"daily": rng.randint(5, 30)}, "t")
        if step % 70 == 30:
            await app.rules.remove_user_override(user, "shell", None, actor="t")
        if step % 60 == 45:
            await app.rules.reset_usage(user, rng.choice([None, *TYPES]), actor="t")
    recount = await _recount(app)
    maintained = await _maintained(app)
    assert len(recount) > 20  # the workload reached most users
    assert maintained == recount
    # And the ranking the users page shows follows those peaks.
    body = (await call(app, "GET", f"{API}/users?sort=utilization&per_page=200")).json
    shown = [(u["username"], u["max_percent"]) for u in body["items"] if u["username"] in recount]
    ranked = sorted(recount.items(), key=lambda kv: (-(kv[1] if kv[1] is not None else -1), kv[0]))
    assert shown == ranked


@pytest.mark.gen_test(timeout=120)
@pytest.mark.parametrize("search", ["", "u"])
async def test_cursor_pages_return_every_user_exactly_once_while_users_change(app_factory, search):
    app = await app_factory()
    first = [f"u{i:03d}" for i in range(0, 120, 2)]
    for name in first:
        assert (await consume(app, name)).code == 200
    seen: list[str] = []
    cursor = None
    page = 0
    while True:
        query = f"{API}/users?per_page=7&q={search}" + (f"&cursor={cursor}" if cursor else "")
        body = (await call(app, "GET", query)).json
        seen += [u["username"] for u in body["items"]]
        # Between pages: new users appear (before and after the cursor), usage changes.
        await consume(app, f"u{2 * page + 1:03d}")
        await consume(app, first[page % len(first)], "shell", 3)
        page += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen))  # nothing twice
    assert set(first) <= set(seen)  # every user that existed throughout, once


@pytest.mark.gen_test
async def test_a_forged_cursor_is_a_400(app_factory):
    app = await app_factory()
    for cursor in ("not-base64!", "e30", "W10", "eyJuIjogMX0"):
        resp = await call(app, "GET", f"{API}/users?cursor={cursor}")
        assert resp.code == 400 and resp.json["error"]["code"] == "invalid_parameter", cursor


@pytest.mark.gen_test(timeout=60)
async def test_a_searched_utilisation_order_is_the_same_by_either_index_path(
    app_factory, monkeypatch
):
    """A rare prefix is ranked from key lookups, a common one by walking today's ranking:
    both give the unsearched order, filtered by the prefix."""
    from quotaserver import users_page

    app = await app_factory(clock=FakeClock())
    await app.rules.set_global_limits("shell", {"daily": 40}, actor="t")
    rng = random.Random(3)
    names = [f"{p}{i}" for p in ("Ab", "ab", "ac", "b") for i in range(6)]
    for name in names:
        if rng.random() < 0.8:  # some stay idle
            assert (await consume(app, name, "shell", rng.randint(1, 40))).code == 200

    async def order(search: str) -> list[str]:
        body = await call(app, "GET", f"{API}/users?sort=utilization&per_page=200&q={search}")
        return [u["username"] for u in body.json["items"]]

    everyone = await order("")
    for few in (0, 10_000):
        monkeypatch.setattr(users_page, "FEW_MATCHES", few)
        for search in ("ab", "A", "ac1", "zz"):
            expected = [n for n in everyone if n.lower().startswith(search.lower())]
            assert await order(search) == expected, (few, search)


@pytest.mark.gen_test(timeout=60)
async def test_name_pages_list_accented_names_exactly_once(app_factory):
    """The cursor's position is lower-cased by the database, as the order is (Python's
    str.lower() differs beyond ASCII: "Émile" would make the next page skip "élan")."""
    app = await app_factory()
    names = ["Émile", "élan", "émile2", "Zed", "zoë", "Ålborg", "anna", "Bob", "ÉCOLE"]
    for name in names:
        assert (await consume(app, name)).code == 200
    seen: list[str] = []
    cursor = None
    while True:
        query = f"{API}/users?sort=username&per_page=1" + (f"&cursor={cursor}" if cursor else "")
        body = (await call(app, "GET", query)).json
        seen += [u["username"] for u in body["items"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(names)
    everyone = (await call(app, "GET", f"{API}/users?sort=username&per_page=50")).json["items"]
    assert seen == [u["username"] for u in everyone]
