"""The same models and hot-path SQL on a real PostgreSQL server (started for this module).

Skipped with a reason where PostgreSQL's server binaries are not installed; `.ci/run`
installs them so CI always runs this module.
"""

from __future__ import annotations

import asyncio

import pytest
from clients import SERVICE, call, consume, ws_connect
from services import INITDB, needs

from quotaserver.models import Alert, Usage, User, Violation

pytestmark = needs(
    INITDB is not None,
    reason="PostgreSQL server binaries not installed (apt-get install postgresql)",
)


async def count(app, model, *where):
    return await app.store.run(
        lambda: model.select().where(*where).count() if where else model.select().count()
    )


@pytest.mark.gen_test(timeout=60)
async def test_consume_check_and_violation_on_postgresql(pg_app):
    app = await pg_app()
    assert not app.store.is_sqlite
    health = await call(app, "GET", "/api/ws/health")
    assert health.json["database"]["pool"] == {"writers": 4, "readers": 2}  # one process
    await app.rules.set_global_limits("code", {"daily": 3}, actor="t")
    ok = await consume(app, "alice", "code", 2)
    assert ok.code == 200 and ok.json["periods"]["daily"]["used"] == 2
    denied = await consume(app, "alice", "code", 2)
    assert denied.code == 429 and denied.json["violation"]["attempted"] == 4
    check = await call(app, "POST", "/api/quotas/check",
                       {"user": "alice", "command_type": "code"}, token=SERVICE)  # fmt: skip
    assert check.code == 200 and check.json["periods"]["daily"]["remaining"] == 1
    assert await count(app, Violation) == 1
    status = await call(app, "GET", "/api/quotas/users/alice", token=SERVICE)
    assert status.json["command_types"]["code"]["daily"]["used"] == 2


@pytest.mark.gen_test(timeout=60)
async def test_a_freshly_migrated_postgresql_database_is_what_the_models_declare(pg_app):
    from schema_check import disagreements

    app = await pg_app()
    assert await app.store.run(lambda: disagreements(app.store.db)) == []


@pytest.mark.gen_test(timeout=120)
async def test_concurrent_consumes_never_over_admit_on_postgresql(pg_app):
    app = await pg_app(database__pool_size=8)
    await app.rules.set_global_limits("shell", {"daily": 50}, actor="t")
    await consume(app, "bob", "shell")  # creates the user and its counters
    watcher = await ws_connect(app, "types=violation")
    await watcher.recv_type("welcome")
    results = await asyncio.gather(*(consume(app, "bob", "shell") for _ in range(200)))
    codes = [r.code for r in results]
    assert codes.count(200) == 49 and codes.count(429) == 151
    used = await app.store.run(
        lambda: Usage.select(Usage.used).join(User)
        .where((User.username == "bob") & (Usage.period == "daily")).scalar()
    )  # fmt: skip
    assert used == 50
    assert await count(app, Violation) == 151
    # Every violation reaches a live client once, whatever order the workers committed in.
    seqs = [(await watcher.recv_type("violation"))["seq"] for _ in range(151)]
    assert len(set(seqs)) == 151
    watcher.close()


@pytest.mark.gen_test(timeout=120)
async def test_concurrent_first_consumes_create_the_user_and_counters_once(pg_app):
    # No user and no counter rows yet: concurrent transactions race to create them (the
    # losers of each INSERT wait and take the update path) and lock the windows in one
    # order, so none fails, none deadlocks and the limit holds in every window.
    app = await pg_app(database__pool_size=8)
    await app.rules.set_global_limits("code", {"daily": 40, "weekly": 45}, actor="t")
    results = await asyncio.gather(*(consume(app, "carl", "code") for _ in range(120)))
    codes = [r.code for r in results]
    assert codes.count(200) == 40 and codes.count(429) == 80
    assert {r.json["violation"]["period"] for r in results if r.code == 429} == {"daily"}
    rows = await app.store.run(
        lambda: sorted(
            (u.period, u.used) for u in Usage.select().join(User).where(User.username == "carl")
        )
    )
    assert rows == sorted((period, 40) for period in app.quota.periods)  # one row each
    assert await count(app, User, User.username == "carl") == 1


@pytest.mark.gen_test(timeout=120)
async def test_concurrent_batches_and_single_consumes_share_the_limits_exactly(pg_app):
    # Users and counters that do not exist yet, raced for by batches (which lock every
    # counter they touch, sorted) and single consumes (which lock one user's, shortest
    # window first), with a user's own rule that beats the default: none deadlocks, none
    # over-admits, and every refusal is a violation.
    app = await pg_app(database__pool_size=8)
    await app.rules.set_global_limits("code", {"daily": 30, "weekly": 1000}, actor="t")
    await consume(app, "pam", "code")
    await app.rules.set_user_limits("pam", "code", {"daily": 10}, actor="t")
    users = ["pam", "quinn", "ravi", "sue"]
    decisions = [{"user": u, "command_type": "code"} for u in reversed(users)] * 10
    batches = [
        call(app, "POST", "/api/quotas/consume/batch", {"decisions": decisions}, token=SERVICE)
        for _ in range(6)
    ]
    singles = [consume(app, u, "code") for u in users for _ in range(15)]
    answers = await asyncio.gather(*batches, *singles)
    assert {a.code for a in answers[:6]} == {200}
    items = [r for a in answers[:6] for r in a.json["results"]] + [a.json for a in answers[6:]]
    admitted = {u: sum(1 for r in items if r["user"] == u and r["allowed"]) for u in users}
    assert admitted == {"pam": 9, "quinn": 30, "ravi": 30, "sue": 30}  # pam had 1 already
    refused = sum(1 for r in items if not r["allowed"])
    assert refused == len(items) - 99
    assert await count(app, Violation) == refused
    used = await app.store.run(
        lambda: {
            (u.user.username, u.period): u.used
            for u in Usage.select(Usage, User).join(User).where(Usage.command_type == "code")
            if u.period in ("daily", "weekly")
        }
    )
    assert used == {
        **{(u, "daily"): 30 for u in users[1:]},
        **{(u, "weekly"): 30 for u in users[1:]},
        ("pam", "daily"): 10,
        ("pam", "weekly"): 10,
    }
    assert await count(app, User) == 4


@pytest.mark.gen_test(timeout=120)
async def test_concurrent_batches_with_the_same_keys_count_each_key_once(pg_app):
    # Each batch looks its keys up first, finds none and decides; the later ones wait on
    # the counters' row lock, then find the key taken by the first and answer its answer.
    app = await pg_app(database__pool_size=8)
    await app.rules.set_global_limits("code", {"daily": 1000}, actor="t")
    await consume(app, "kay", "code")
    decisions = [{"user": "kay", "command_type": "code", "key": f"b-{i}"} for i in range(20)]
    answers = await asyncio.gather(
        *(
            call(app, "POST", "/api/quotas/consume/batch", {"decisions": decisions},
                 token=SERVICE)
            for _ in range(4)
        )
    )  # fmt: skip
    assert {a.code for a in answers} == {200}
    results = [a.json["results"] for a in answers]
    for i in range(20):  # every batch answers each item with the first answer
        assert {r[i]["status"] for r in results} == {200}
        assert {r[i]["periods"]["daily"]["used"] for r in results} == {i + 2}
    assert sum(1 for r in results for item in r if not item.get("replayed")) == 20
    used = await app.store.run(
        lambda: Usage.select(Usage.used).join(User)
        .where((User.username == "kay") & (Usage.period == "daily")).scalar()
    )  # fmt: skip
    assert used == 21


@pytest.mark.gen_test(timeout=60)
async def test_rules_alerts_and_replay_on_postgresql(pg_app):
    app = await pg_app()
    await app.rules.set_user_limits("carol", "test", {"daily": 1, "weekly": None}, actor="t")
    listed = await app.rules.list_rules()
    assert listed["overrides"]["carol"]["test"] == {"daily": 1, "weekly": None}
    first = await app.alerts.raise_alert("manual", "high", "x", dedupe_day="2026-03-10")
    again = await app.alerts.raise_alert("manual", "high", "x", dedupe_day="2026-03-10")
    assert again["alert_id"] == first["alert_id"] and again["count"] == 2
    assert await count(app, Alert) == 1
    ws = await ws_connect(app)
    welcome = await ws.recv_type("welcome")
    ws.close()
    await consume(app, "carol", "test", 5)
    resumed = await ws_connect(app, f"last_seq={welcome['data']['seq']}")
    violation = await resumed.recv_type("violation")
    assert violation["data"]["username"] == "carol"
    recovered = await resumed.recv_type("recovered")
    # The one violation is all that happened since the welcome (a single denial opens no alert).
    assert recovered["data"]["recovered"] is True and recovered["data"]["missed"] == 1
    assert recovered["data"]["seq"] == violation["seq"]
    resumed.close()


def _terminate_other_backends(url: str) -> int:
    """From a connection of its own: end every other session, as a server restart would."""
    import psycopg2

    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return cur.fetchone()[0]


@pytest.mark.gen_test(timeout=60)
async def test_the_app_reconnects_after_losing_the_database(pg_app, pg_url):
    """Every pooled connection dies (a restart, a failover): the next calls find the dead
    connection, replace it and succeed, without restarting quotaserver."""
    app = await pg_app(database__pool_size=1)  # one worker: its one connection is the lost one
    assert (await call(app, "GET", "/api/health", token=None)).code == 200
    assert _terminate_other_backends(pg_url) >= 1
    health = await call(app, "GET", "/api/health", token=None)
    assert health.code == 200 and health.json["database"] == {"reachable": True}
    assert (await consume(app, "lee")).code == 200
    assert _terminate_other_backends(pg_url) >= 1
    assert (await consume(app, "lee")).code == 200  # a write, too, is retried when safe


@pytest.mark.gen_test(timeout=60)
async def test_an_unexpected_error_is_the_500_envelope_without_a_traceback(pg_app, monkeypatch):
    app = await pg_app()

    async def broken(user: str) -> None:
        raise RuntimeError("a bug, not bad input")

    monkeypatch.setattr(app.quota, "user_status", broken)  # fault injection: a server bug
    failed = await call(app, "GET", "/api/quotas/users/lee", token=SERVICE)
    assert failed.code == 500
    error = failed.json["error"]
    assert (error["code"], error["message"]) == ("internal_error", "internal server error")
    assert set(error) == {"code", "message", "error_id"}
    assert b"Traceback" not in failed.body and b"a bug" not in failed.body


@pytest.mark.gen_test(timeout=60)
async def test_the_users_total_takes_an_id_that_committed_out_of_order_at_the_next_count(
    pg_app, pg_url, monkeypatch
):
    """The unsearched users total is a remembered full count plus the users above its highest
    id (a users page never counts a million rows). PostgreSQL may commit ids out of order:
    one drawn before the count and committed after it is taken in by the next full count,
    ``RECOUNT_AFTER`` seconds later (docs/admin-api.md)."""
    import psycopg2

    from quotaserver import users_page

    app = await pg_app()
    assert (await consume(app, "ann")).code == 200
    late = psycopg2.connect(pg_url)  # draws the next id and holds it uncommitted
    try:
        with late.cursor() as cur:
            cur.execute('INSERT INTO "user" (username, created_at) VALUES (%s, now())', ("late",))
        assert (await consume(app, "bob")).code == 200  # a higher id, committed first

        async def total() -> int:
            resp = await call(app, "GET", "/api/admin/quotas/users?per_page=5")
            assert resp.code == 200, resp.json
            return resp.json["total"]

        assert await total() == 2  # ann and bob: the full count taken now
        late.commit()
        assert (await consume(app, "carl")).code == 200  # above the count: counted at once
        assert await total() == 3  # late's id is below the count's highest: not yet
        monkeypatch.setattr(users_page, "RECOUNT_AFTER", 0.0)
        assert await total() == 4  # the next full count has it
    finally:
        late.close()


@pytest.mark.gen_test(timeout=60)
async def test_plugin_storage_and_alerts_that_end_on_postgresql(pg_app):
    app = await pg_app()
    await app.plugin_storage.save("pg_plugin", "cursor:ops", 5)
    await app.plugin_storage.save("pg_plugin", "cursor:ops", 6)  # the upsert replaces it
    assert await app.plugin_storage.load("pg_plugin") == {"cursor:ops": 6}
    opened = await app.alerts.raise_alert("high_system_load", "critical", "load high")
    [ended] = await app.alerts.end("high_system_load")
    assert ended["alert_id"] == opened["alert_id"] and ended["resolved_by"] == "system"
    again = await app.alerts.raise_alert("high_system_load", "critical", "load high")
    assert again["alert_id"] != opened["alert_id"] and again["count"] == 1


@pytest.mark.gen_test(timeout=90)
async def test_load_refusals_history_buckets_and_violators_on_postgresql(pg_app):
    """Issue 25's SQL on PostgreSQL: refusal upserts, grouped history, the violators order."""
    app = await pg_app(
        plugins={"alert_engine": {"enabled": False}},
        throttle__cpu_bands=[[80, 0.5], [95, 0.0]],  # a band at 0: the defaults never refuse
    )
    api = "/api/admin/quotas"
    await app.rules.set_global_limits("shell", {"daily": 1}, actor="t")
    for name, denied in (("Pat", 2), ("al", 3)):
        assert (await consume(app, name)).code == 200
        for _ in range(denied):
            assert (await consume(app, name)).code == 429
    app.load.update(99.5, 10.0)
    for _ in range(2):
        assert (await consume(app, "al")).code == 503
    app.load.update(10.0, 10.0)
    users = (await call(app, "GET", f"{api}/users?sort=violations")).json
    assert [(u["username"], u["violations_today"]) for u in users["items"]] == [
        ("al", 3),
        ("Pat", 2),
    ]
    assert [u["load_refusals_today"] for u in users["items"]] == [2, 0]
    for minutes, bucket in ((60, 60), (1440, 600), (43200, 86400)):
        h = (await call(app, "GET", f"{api}/history?minutes={minutes}&bucket={bucket}")).json
        points = h["activity"]
        assert sum(p["refused"] for p in points) == 2 and sum(p["violations"] for p in points) == 5
        assert sum(p["commands"] for p in points) == 2
        assert all(isinstance(p["commands"], int) for p in points)
    assert app.stats_snapshot()["load_refusals_today"] == 2
