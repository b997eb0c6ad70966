"""The users page built from plain SQL and tuples (quotaserver.users_page) is, JSON for JSON,
the page the ORM form (tests/ranking_oracle.py and model queries) builds."""

from __future__ import annotations

import random
from typing import Any

import pytest
from clients import call, consume
from conftest import FakeClock
from peewee import fn
from ranking_oracle import UserRanking
from services import INITDB, needs

from quotaserver import users_page
from quotaserver.admin_queries import AdminQueries, PageRequest
from quotaserver.cursors import decode_cursor, encode_cursor
from quotaserver.events import last_seq
from quotaserver.limits import Rules
from quotaserver.models import Usage, Violation, naive_utc
from quotaserver.standings import daily_of

TYPES = ("shell", "code", "test", "review")
NAMES = ["Émile", "élan", "ÉCOLE", "zoë", "Ålborg", "Zed"] + [
    f"{p}{i}" for p in ("Ab", "ab", "ac", "b", "u", "U") for i in range(9)
]


def orm_page(
    queries: AdminQueries, search: str, sort: str, page: PageRequest, cursor: str | None
) -> dict[str, Any]:
    """The users page as the ORM built it before quotaserver.users_page (the reference)."""
    today = queries._today()
    rank = UserRanking(queries.store.db, search, today.key)
    after = decode_cursor(cursor) if cursor else None
    if sort == "utilization":
        users, last = rank.by_utilization(page, after)
    else:
        users, last = rank.by_name(page, after)
    ids = [u.id for u in users]
    rules = Rules(ids)
    used: dict[int, dict[str, int]] = {}
    for row in Usage.select(Usage.user, Usage.command_type, Usage.used).where(
        daily_of(ids, today.key)
    ):
        used.setdefault(row.user_id, {})[row.command_type] = row.used
    violations = {}
    if ids:
        rows = (
            Violation.select(Violation.user, fn.COUNT(Violation.id).alias("n"))
            .where(Violation.user.in_(ids) & (Violation.created_at >= naive_utc(today.start)))
            .group_by(Violation.user)
        )
        violations = {row.user_id: row.n for row in rows}
    items = [queries._user_json(u, used.get(u.id, {}), rules, violations.get(u.id, 0))
             for u in users]  # fmt: skip
    result = page.result(items, rank.total(), last_seq())
    result["next_cursor"] = encode_cursor(last) if last is not None else None
    result["risk_levels"] = [["critical", 95.0], ["high", 90.0], ["elevated", 80.0]]
    return result


@pytest.mark.gen_test(timeout=180)
async def test_the_sql_users_page_equals_the_orm_page_on_a_mixed_dataset(app_factory, monkeypatch):
    await compare_pages(await app_factory(clock=FakeClock()), monkeypatch)


@needs(INITDB is not None, reason="PostgreSQL server binaries not installed")
@pytest.mark.gen_test(timeout=60)
async def test_the_sql_users_page_equals_the_orm_page_on_postgresql(pg_app, monkeypatch):
    await compare_pages(await pg_app(clock=FakeClock()), monkeypatch)


async def seed_mixed(app: Any, rng: random.Random) -> None:
    """Overrides, violations, unlimited and idle users."""
    await app.rules.set_global_limits("shell", {"daily": 30}, actor="t")
    await app.rules.set_global_limits("test", {"daily": None}, actor="t")  # unlimited
    for name in NAMES:
        if rng.random() < 0.75:  # the rest stay idle today
            for _ in range(rng.randint(1, 3)):
                await consume(app, name, rng.choice(TYPES[:3]), rng.randint(1, 25))
        else:
            await app.rules.set_user_limits(name, "code", {"daily": 5}, "t")  # idle, created
    for name in rng.sample(NAMES, 8):  # overrides, some over the limit already
        await app.rules.set_user_limits(name, "shell", {"daily": rng.randint(3, 40)}, "t")
    for name in rng.sample(NAMES, 6):  # violations today (429s); a zero limit: exhausted
        await app.rules.set_user_limits(name, "review", {"daily": 0}, "t")
        await consume(app, name, "review", 1)
        await consume(app, name, "shell", 50)


async def compare_one_order(
    app: Any, queries: AdminQueries, sort: str, search: str, per_page: int
) -> int:
    """Numbered pages (offsets beyond the active users too), then every cursor page, of
    one order: the SQL page equals the ORM page each time. Returns the cursor pages."""
    for number in (1, 2, 9):
        page = PageRequest(number, per_page)
        fast, slow = await app.store.read(
            lambda p=page: (
                queries._users_sync(search, sort, p, None),
                orm_page(queries, search, sort, p, None),
            )
        )
        assert fast == slow, (sort, search, per_page, number)
    compared, cursor = 0, None
    while True:
        page = PageRequest(1, per_page)
        fast, slow = await app.store.read(
            lambda p=page, c=cursor: (
                queries._users_sync(search, sort, p, c),
                orm_page(queries, search, sort, p, c),
            )
        )
        assert fast == slow, (sort, search, per_page, cursor)
        compared += 1
        cursor = fast["next_cursor"]
        if cursor is None:
            return compared


async def compare_pages(app: Any, monkeypatch: Any) -> None:
    await seed_mixed(app, random.Random(11))
    queries = AdminQueries(app)
    compared = 0
    for few in (0, 10_000):  # both index paths of a searched utilisation order
        monkeypatch.setattr(users_page, "FEW_MATCHES", few)
        for sort in ("utilization", "username"):
            for search in ("", "ab", "É", "u", "zz"):
                for per_page in (1, 7, 100):
                    compared += await compare_one_order(app, queries, sort, search, per_page)
    assert compared > 100
    # The dataset is mixed: overrides, violations, unlimited and idle users all appear.
    body = (await call(app, "GET", "/api/admin/quotas/users?per_page=100")).json
    items = body["items"]
    assert body["total"] == len(NAMES)
    assert any(i["violations_today"] for i in items)
    assert any(u["overridden"] for i in items for u in i["usage"].values())
    assert any(i["max_percent"] == 0 for i in items)  # idle
    assert any(i["max_percent"] >= 100 for i in items)  # exhausted
