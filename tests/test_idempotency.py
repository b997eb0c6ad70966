"""Idempotency-Key on consume and refunds, over real HTTP against a real SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime

import pytest
from clients import ADMIN, SERVICE, call, ws_connect
from conftest import FakeClock
from waits import wait_until

from quotaserver import retention
from quotaserver.models import (
    AuditLog,
    Event,
    IdempotencyKey,
    PluginData,
    SchemaVersion,
    Usage,
    User,
    Violation,
)


async def keyed(app, key, user="alice", command_type="shell", count=1, token=SERVICE):
    body = {"user": user, "command_type": command_type, "count": count}
    headers = {} if key is None else {"Idempotency-Key": key}
    return await call(app, "POST", "/api/quotas/consume", body, token=token, headers=headers)


async def refund(app, key, user="alice", command_type="shell", token=SERVICE):
    body = {"user": user, "command_type": command_type, "key": key}
    return await call(app, "POST", "/api/quotas/refund", body, token=token)


async def used(app, user, period="daily", command_type="shell") -> int:
    def read() -> int:
        rows = (
            Usage.select(Usage.used)
            .join(User)
            .where(
                (User.username == user)
                & (Usage.period == period)
                & (Usage.command_type == command_type)
            )
            .order_by(Usage.window_start.desc())
        )
        row = rows.first()
        return row.used if row else 0

    return await app.store.run(read)


async def count(app, model, *where) -> int:
    return await app.store.run(
        lambda: model.select().where(*where).count() if where else model.select().count()
    )


@pytest.mark.gen_test
async def test_three_retries_of_one_keyed_consume_count_once_and_answer_the_same(app_factory):
    app = await app_factory()
    first = await keyed(app, "order-1", count=3)
    assert first.code == 200 and first.json["periods"]["daily"]["used"] == 3
    assert "Idempotent-Replayed" not in first.headers
    retries = [await keyed(app, "order-1", count=3) for _ in range(3)]
    for retry in retries:
        assert retry.code == 200
        assert retry.body == first.body  # byte for byte: used is still 3, not 6
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert retry.headers["RateLimit-Policy"] == first.headers["RateLimit-Policy"]
    assert await used(app, "alice") == 3
    assert await used(app, "alice", "monthly") == 3
    # The structured-field spelling of the header is the same key.
    quoted = await keyed(app, '"order-1"', count=3)
    assert quoted.headers["Idempotent-Replayed"] == "true" and quoted.body == first.body
    # An unkeyed consume still counts each time.
    assert (await keyed(app, None)).json["periods"]["daily"]["used"] == 4
    assert await used(app, "alice") == 4


@pytest.mark.gen_test
async def test_the_same_key_with_another_body_is_422_and_counts_nothing(app_factory):
    app = await app_factory()
    assert (await keyed(app, "k-2", count=2)).code == 200
    for other in ({"count": 3}, {"user": "bob", "count": 2}, {"command_type": "code", "count": 2}):
        resp = await keyed(app, "k-2", **other)
        assert resp.code == 422, resp
        assert resp.json == {
            "error": {
                "code": "idempotency_key_reused",
                "message": "this Idempotency-Key was used with a different request",
            }
        }
    assert await used(app, "alice") == 2
    assert await count(app, User, User.username == "bob") == 0
    # count 1 spelled out or left out is one request.
    assert (await keyed(app, "k-3")).code == 200
    body = {"user": "alice", "command_type": "shell"}
    again = await call(
        app, "POST", "/api/quotas/consume", body, token=SERVICE, headers={"Idempotency-Key": "k-3"}
    )
    assert again.code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert await used(app, "alice") == 3


@pytest.mark.gen_test
async def test_keys_belong_to_the_token_that_sent_them(app_factory):
    app = await app_factory()
    assert (await keyed(app, "shared", count=2)).code == 200
    other = await keyed(app, "shared", count=2, token=ADMIN)  # another token: its own key
    assert other.code == 200 and "Idempotent-Replayed" not in other.headers
    assert await used(app, "alice") == 4
    # Nor can it refund the service's consume (its own it can).
    assert (await refund(app, "shared", token=ADMIN)).code == 200
    assert await used(app, "alice") == 2
    assert (await refund(app, "shared")).code == 200
    assert await used(app, "alice") == 0


@pytest.mark.gen_test
async def test_a_refused_keyed_consume_replays_its_429_and_records_one_violation(app_factory):
    clock = FakeClock(datetime(2026, 3, 10, 18, 0, tzinfo=UTC))
    app = await app_factory(clock=clock)
    await app.rules.set_global_limits("code", {"daily": 3}, actor="test")
    first = await keyed(app, "big", command_type="code", count=5)
    assert first.code == 429 and first.headers["Retry-After"] == str(6 * 3600)
    clock.advance(hours=1)
    again = await keyed(app, "big", command_type="code", count=5)
    assert again.code == 429 and again.body == first.body
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Retry-After"] == str(5 * 3600)  # the same reset, an hour nearer
    assert again.headers["RateLimit"] == '"daily";r=3;t=18000'
    assert await count(app, Violation) == 1
    assert await count(app, Event, Event.type == "violation") == 1
    # A refused consume counted nothing: there is nothing to refund.
    assert (await refund(app, "big", command_type="code")).code == 404


@pytest.mark.gen_test
async def test_bad_keys_are_400_with_the_envelope(app_factory):
    app = await app_factory()
    for bad in ("", "x" * 256, "caf\u00e9"):
        resp = await call(
            app, "POST", "/api/quotas/consume", {"user": "a", "command_type": "shell"},
            token=SERVICE, headers={"Idempotency-Key": bad.encode().decode("latin-1")},
        )  # fmt: skip
        assert resp.code == 400, (bad, resp)
        assert resp.json["error"]["code"] == "invalid_idempotency_key"
    assert await count(app, User) == 0


@pytest.mark.gen_test(timeout=60)
async def test_a_key_still_being_decided_is_409(app_factory, tmp_path):
    app = await app_factory(database__busy_timeout=30.0)
    # Another process's write lock on the real file holds the first consume in flight.
    blocker = sqlite3.connect(f"{tmp_path}/quotaserver.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    first = asyncio.ensure_future(keyed(app, "slow"))
    try:
        await wait_until(lambda: app.quota.in_flight._keys, "the first consume in flight")
        second = await keyed(app, "slow")
        assert second.code == 409
        assert second.json["error"]["code"] == "idempotency_key_in_flight"
        assert second.headers["Retry-After"] == "1"
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert (await first).code == 200
    third = await keyed(app, "slow")
    assert third.headers["Idempotent-Replayed"] == "true"
    assert await used(app, "alice") == 1


@pytest.mark.gen_test
async def test_keys_expire_after_the_ttl_and_retention_prunes_them(app_factory):
    clock = FakeClock(datetime(2026, 3, 10, 1, 0, tzinfo=UTC))
    app = await app_factory(clock=clock, quotas__idempotency_ttl=3600)
    assert (await keyed(app, "t-1")).code == 200
    assert (await keyed(app, "t-2")).code == 200
    clock.advance(minutes=59)
    assert (await keyed(app, "t-1")).headers["Idempotent-Replayed"] == "true"
    clock.advance(minutes=2)
    # Expired: the key is new again, counted once more, and remembered anew.
    fresh = await keyed(app, "t-1")
    assert (
        "Idempotent-Replayed" not in fresh.headers and fresh.json["periods"]["daily"]["used"] == 3
    )
    assert (await keyed(app, "t-1")).headers["Idempotent-Replayed"] == "true"
    deleted = await retention.prune(app)
    assert deleted["idempotency_keys"] == 1  # t-2; t-1's row was renewed
    assert await app.store.run(lambda: [r.key for r in IdempotencyKey.select()]) == ["t-1"]


@pytest.mark.gen_test
async def test_refund_gives_back_exactly_one_consume_once_audited_and_published(app_factory):
    app = await app_factory()
    ws = await ws_connect(app)
    await ws.recv_type("welcome")
    assert (await keyed(app, "r-1", count=4)).code == 200
    assert (await keyed(app, "r-2", count=1)).code == 200
    resp = await refund(app, "r-1")
    assert resp.code == 200 and "Idempotent-Replayed" not in resp.headers
    body = resp.json
    assert body["count"] == 4 and body["key"] == "r-1"
    assert body["refunded_periods"] == ["daily", "weekly", "monthly"]
    assert body["closed_periods"] == []
    assert body["periods"]["daily"]["used"] == 1
    assert await used(app, "alice") == 1 and await used(app, "alice", "weekly") == 1
    again = await refund(app, "r-1")
    assert again.code == 200 and again.body == resp.body
    assert again.headers["Idempotent-Replayed"] == "true"
    assert await used(app, "alice") == 1
    change = await ws.recv_type("quota_change")
    assert change["data"]["action"] == "usage_refund"
    assert change["data"]["username"] == "alice" and change["data"]["count"] == 4
    audits = await app.store.run(
        lambda: [
            (a.actor, a.action) for a in AuditLog.select().where(AuditLog.action.contains("refund"))
        ]
    )
    assert audits == [("test-service", "usage.refund")]
    assert await count(app, Event, Event.type == "quota_change") == 1
    ws.conn.close()


@pytest.mark.gen_test
async def test_refund_of_an_unknown_key_or_another_users_consume_is_404(app_factory):
    app = await app_factory()
    assert (await keyed(app, "mine", count=2)).code == 200
    for args in (
        {"key": "nope"},
        {"key": "mine", "user": "bob"},
        {"key": "mine", "command_type": "code"},
    ):
        key = args.pop("key")
        resp = await refund(app, key, **args)
        assert resp.code == 404, resp
        assert resp.json["error"]["code"] == "unknown_consume"
    assert await used(app, "alice") == 2
    missing = await call(app, "POST", "/api/quotas/refund", {"user": "alice"}, token=SERVICE)
    assert missing.code == 400 and missing.json["error"]["code"] == "missing_field"
    viewer = await call(
        app, "POST", "/api/quotas/refund", {}, token="viewer-token-for-tests-0123456789"
    )
    assert viewer.code == 403


@pytest.mark.gen_test
async def test_refund_gives_back_only_in_open_windows_and_never_below_zero(app_factory):
    clock = FakeClock(datetime(2026, 3, 10, 23, 30, tzinfo=UTC))  # a Tuesday
    app = await app_factory(clock=clock)
    assert (await keyed(app, "late", count=3)).code == 200
    clock.advance(hours=1)  # the next day: the daily window of the consume has closed
    assert (await keyed(app, None, count=2)).code == 200
    resp = await refund(app, "late")
    assert resp.code == 200
    assert resp.json["refunded_periods"] == ["weekly", "monthly"]
    assert resp.json["closed_periods"] == ["daily"]
    assert resp.json["periods"]["daily"]["used"] == 2  # today's count is not touched
    assert resp.json["periods"]["weekly"]["used"] == 2
    # An admin reset first: the refund stops at zero.
    assert (await keyed(app, "k", count=4)).code == 200
    await app.rules.reset_usage("alice", "shell", actor="test")
    resp = await refund(app, "k")
    assert resp.code == 200 and resp.json["periods"]["daily"]["used"] == 0
    assert await used(app, "alice") == 0


@pytest.mark.gen_test
async def test_a_database_from_before_migration_7_gets_the_key_table(app_factory, tmp_path):
    app = await app_factory()
    assert (await keyed(app, "old")).code == 200

    def downgrade() -> None:  # back to what version 6 left: no key table, no row 7 or later
        db = app.store.db
        db.execute_sql(f'DROP TABLE "{IdempotencyKey._meta.table_name}"')
        db.execute_sql(f'DROP TABLE "{PluginData._meta.table_name}"')  # migration 8's
        SchemaVersion.delete().where(SchemaVersion.version >= 7).execute()

    await app.store.run(downgrade)
    await app.stop()
    upgraded = await app_factory()
    versions = await upgraded.store.run(lambda: [v.version for v in SchemaVersion.select()])
    assert {7, 8} <= set(versions)  # migration 8 (plugin_data) comes back too
    assert (await keyed(upgraded, "new")).code == 200
    assert (await keyed(upgraded, "new")).headers["Idempotent-Replayed"] == "true"
    assert await used(upgraded, "alice") == 2


@pytest.mark.gen_test(timeout=30)
async def test_while_overloaded_a_counted_key_is_still_answered_and_a_new_one_waits(app_factory):
    """Shedding load stores no key, so a retry is decided afresh once load drops; a key
    that had already counted keeps its first answer, overload or not."""
    app = await app_factory(throttle__cpu_bands=[[90, 0.0]])
    first = await keyed(app, "counted", count=2)
    assert first.code == 200
    app.load.update(95, 10)
    again = await keyed(app, "counted", count=2)
    assert (again.code, again.headers.get("Idempotent-Replayed")) == (200, "true")
    assert again.json["periods"] == first.json["periods"]
    shed = await keyed(app, "fresh", user="omar", count=3)
    assert (shed.code, shed.json["reason"]) == (503, "system_overloaded")
    assert (shed.json["user"], shed.json["count"]) == ("omar", 3)
    assert "Idempotent-Replayed" not in shed.headers
    shed = await keyed(app, "fresh")
    app.load.update(10, 10)
    later = await keyed(app, "fresh")
    assert later.code == 200 and "Idempotent-Replayed" not in later.headers
    assert later.json["periods"]["daily"]["used"] == 3


@pytest.mark.gen_test(timeout=30)
async def test_a_keyed_consume_is_published_and_counted_like_an_unkeyed_one(app_factory):
    """Its violation reaches live clients, the decision reaches the plugins and /metrics,
    and the answer carries the throttle factor it was decided under."""
    from scrape import scrape, value

    app = await app_factory(throttle__cpu_bands=[[90, 0.5]])
    await app.rules.set_global_limits("code", {"daily": 2}, actor="test")
    watcher = await ws_connect(app, "types=violation")
    await watcher.recv_type("welcome")
    before = await scrape(app)
    app.load.update(95, 10)  # the factor is 0.5: admitted, and said so
    admitted = await keyed(app, "k-ok", command_type="code", count=2)
    assert admitted.code == 200 and admitted.json["throttle_factor"] == 0.5
    refused = await keyed(app, "k-over", command_type="code")
    assert refused.code == 429
    event = await watcher.recv_type("violation")
    assert (event["data"]["username"], event["data"]["attempted"]) == ("alice", 3)
    after = await scrape(app)
    name = "quotaserver_decisions_total"
    for result in ("allowed", "denied"):
        was = before.get((name, (("result", result),)), 0)
        assert value(after, name, result=result) - was == 1, result
