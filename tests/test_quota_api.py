"""The quota API over real HTTP against a real SQLite file."""

import asyncio
from datetime import UTC, datetime

import pytest
from clients import SERVICE, VIEWER, call, consume
from conftest import FakeClock

from quotaserver.models import Event, Usage, User, Violation


async def db_count(app, model, *where):
    def count():
        query = model.select()
        if where:
            query = query.where(*where)
        return query.count()

    return await app.store.run(count)


async def used(app, user, command_type="shell", period="daily"):
    def read():
        rows = (
            Usage.select(Usage.used)
            .join(User)
            .where(
                (User.username == user)
                & (Usage.command_type == command_type)
                & (Usage.period == period)
            )
            .order_by(Usage.window_start.desc())
        )
        row = rows.first()
        return row.used if row else 0

    return await app.store.run(read)


@pytest.mark.gen_test
async def test_consume_returns_every_window_and_rate_limit_headers(app_factory):
    clock = FakeClock(datetime(2026, 3, 10, 12, 0, tzinfo=UTC))
    app = await app_factory(clock=clock)
    resp = await consume(app, "alice", "shell", 2)
    assert resp.code == 200
    body = resp.json
    assert body["allowed"] is True
    assert body["user"] == "alice" and body["command_type"] == "shell"
    assert body["throttle_factor"] == 1.0  # no load injected: below every band
    assert body["periods"]["daily"] == {
        "limit": 500,
        "used": 2,
        "remaining": 498,
        "resets_at": "2026-03-11T00:00:00.000Z",
    }
    assert body["periods"]["weekly"]["resets_at"] == "2026-03-16T00:00:00.000Z"
    assert body["periods"]["monthly"]["resets_at"] == "2026-04-01T00:00:00.000Z"
    assert resp.headers["RateLimit-Limit"] == "500"
    assert resp.headers["RateLimit-Remaining"] == "498"
    assert resp.headers["RateLimit-Reset"] == str(12 * 3600)  # noon to midnight UTC


@pytest.mark.gen_test
async def test_denial_is_429_records_one_violation_and_changes_no_counter(app_factory):
    clock = FakeClock(datetime(2026, 3, 10, 18, 0, tzinfo=UTC))
    app = await app_factory(clock=clock)
    await app.rules.set_global_limits("code", {"daily": 3}, actor="test")
    assert (await consume(app, "bob", "code", 2)).code == 200
    resp = await consume(app, "bob", "code", 2)
    assert resp.code == 429
    body = resp.json
    assert body["allowed"] is False
    assert body["violation"]["period"] == "daily"
    assert body["violation"]["limit"] == 3
    assert body["violation"]["attempted"] == 4
    assert "daily" in body["violation"]["message"].lower()
    assert resp.headers["Retry-After"] == str(6 * 3600)  # until midnight UTC, exactly
    assert resp.headers["RateLimit-Remaining"] == "1"
    assert await used(app, "bob", "code") == 2
    assert await used(app, "bob", "code", "weekly") == 2
    assert await db_count(app, Violation) == 1
    assert await db_count(app, Event, Event.type == "violation") == 1


@pytest.mark.gen_test
async def test_check_has_no_side_effects(app_factory):
    app = await app_factory()
    await app.rules.set_global_limits("review", {"daily": 1}, actor="test")
    body = {"user": "carol", "command_type": "review", "count": 5}
    resp = await call(app, "POST", "/api/quotas/check", body, token=SERVICE)
    assert resp.code == 429
    assert resp.json["allowed"] is False
    assert resp.json["violation"]["attempted"] == 5
    assert await db_count(app, User, User.username == "carol") == 0
    assert await db_count(app, Violation) == 0
    body = {"user": "carol", "command_type": "review"}
    ok = await call(app, "POST", "/api/quotas/check", body, token=SERVICE)
    assert ok.code == 200 and ok.json["periods"]["daily"]["used"] == 0


@pytest.mark.gen_test
async def test_check_answers_as_the_consume_would_in_every_case(app_factory):
    """Allowed, over the user's own limit, overloaded: the check's status, headers and body
    are the consume's that follows, but for the usage the consume then adds."""
    app = await app_factory(clock=FakeClock(), throttle__cpu_bands=[[90, 0.0], [50, 0.5]])
    await app.rules.set_global_limits("test", {"daily": 2, "weekly": 5}, actor="test")
    await app.rules.set_user_limits("erin", "test", {"daily": 3, "weekly": None}, actor="test")
    cases = [((10, 10), 2, 200), ((60, 10), 1, 200), ((60, 10), 1, 429), ((95, 10), 1, 503)]
    for (cpu, memory), count, status in cases:
        app.load.update(cpu, memory)
        body = {"user": "erin", "command_type": "test", "count": count}
        check = await call(app, "POST", "/api/quotas/check", body, token=SERVICE)
        done = await call(app, "POST", "/api/quotas/consume", body, token=SERVICE)
        assert (check.code, done.code) == (status, status), (cpu, count, check.json)
        added = count if status == 200 else 0
        checked, consumed = check.json, done.json
        for period, window in checked.pop("periods").items():
            after = consumed["periods"][period]
            assert window["used"] + added == after["used"], period
            assert (window["limit"], window["resets_at"]) == (after["limit"], after["resets_at"])
        consumed.pop("periods")
        assert checked == consumed, (cpu, count)
        if status != 200:
            assert check.headers.get("Retry-After") == done.headers.get("Retry-After")
    assert done.json["reason"] == "system_overloaded" and done.json["throttle_factor"] == 0.0
    app.load.update(10, 10)
    over = await call(
        app, "POST", "/api/quotas/check", {"user": "erin", "command_type": "test"}, token=SERVICE
    )
    assert (over.code, over.json["reason"], over.json["user"]) == (429, "quota_exceeded", "erin")
    assert over.json["violation"] == {
        "period": "daily",
        "limit": 3,
        "attempted": 4,
        "message": "Daily test quota exceeded: 4 attempted, limit 3",
    }
    assert over.json["periods"]["weekly"]["limit"] is None  # the user's own: unlimited


@pytest.mark.gen_test
async def test_user_override_beats_default_and_null_is_unlimited(app_factory):
    app = await app_factory()
    await app.rules.set_global_limits("test", {"daily": 2, "weekly": 5}, actor="test")
    await app.rules.set_user_limits("dana", "test", {"daily": 4, "weekly": None}, actor="test")
    for _ in range(4):
        assert (await consume(app, "dana", "test")).code == 200
    resp = await consume(app, "dana", "test")
    assert resp.code == 429
    assert resp.json["violation"]["period"] == "daily"
    assert resp.json["periods"]["weekly"]["limit"] is None
    assert resp.json["periods"]["weekly"]["remaining"] is None
    # Others still get the global default.
    assert (await consume(app, "erin", "test", 2)).code == 200
    assert (await consume(app, "erin", "test")).code == 429


@pytest.mark.gen_test
async def test_multi_window_denial_reports_first_exhausted_window(app_factory):
    clock = FakeClock(datetime(2026, 3, 10, 12, 0, tzinfo=UTC))  # Tuesday
    app = await app_factory(clock=clock)
    await app.rules.set_global_limits("shell", {"daily": 3, "weekly": 4, "monthly": 4}, "t")
    assert (await consume(app, "fay", "shell", 3)).code == 200
    clock.advance(days=1)
    resp = await consume(app, "fay", "shell", 2)
    # daily has room (0 + 2 <= 3), weekly and monthly do not: weekly is reported.
    assert resp.code == 429
    assert resp.json["violation"]["period"] == "weekly"
    assert resp.json["violation"]["attempted"] == 5
    assert resp.headers["Retry-After"] == str(4 * 86400 + 12 * 3600)  # Wednesday noon to Monday
    # All windows or none: the day's and the hour's fresh counters took nothing either.
    assert resp.json["periods"]["daily"]["used"] == 0
    assert await used(app, "fay", "shell") == 0
    assert await used(app, "fay", "shell", "hourly") == 0
    assert await used(app, "fay", "shell", "weekly") == 3
    # A later consume that fits still counts in every window.
    assert (await consume(app, "fay", "shell", 1)).code == 200
    assert await used(app, "fay", "shell") == 1
    assert await used(app, "fay", "shell", "monthly") == 4


@pytest.mark.gen_test
async def test_concurrent_consumes_never_over_admit(app_factory):
    app = await app_factory()
    await app.rules.set_global_limits("shell", {"daily": 50}, actor="test")
    results = await asyncio.gather(*(consume(app, "gina", "shell") for _ in range(200)))
    codes = [r.code for r in results]
    assert codes.count(200) == 50
    assert codes.count(429) == 150
    assert await used(app, "gina") == 50
    assert await db_count(app, Violation) == 150
    assert await db_count(app, Event, Event.type == "violation") == 150


@pytest.mark.gen_test
async def test_windows_roll_over_in_a_non_utc_zone(app_factory):
    # Europe/Berlin, CET (UTC+1) in January. Monday 2026-01-05 is a week start.
    clock = FakeClock(datetime(2026, 1, 31, 22, 30, tzinfo=UTC))  # Sat 23:30 local, Jan 31
    app = await app_factory(clock=clock, quotas__timezone="Europe/Berlin")
    await app.rules.set_global_limits("shell", {"daily": 1, "weekly": 5, "monthly": 3}, "t")
    first = await consume(app, "hana", "shell")
    assert first.code == 200
    assert first.json["periods"]["daily"]["resets_at"] == "2026-01-31T23:00:00.000Z"
    assert first.json["periods"]["weekly"]["resets_at"] == "2026-02-01T23:00:00.000Z"
    assert first.json["periods"]["monthly"]["resets_at"] == "2026-01-31T23:00:00.000Z"
    assert (await consume(app, "hana", "shell")).json["violation"]["period"] == "daily"

    clock.set(datetime(2026, 1, 31, 23, 0, tzinfo=UTC))  # local midnight: new day and month
    second = await consume(app, "hana", "shell")
    assert second.code == 200
    assert second.json["periods"]["daily"]["used"] == 1
    assert second.json["periods"]["weekly"]["used"] == 2  # same week (Sunday local)
    assert second.json["periods"]["monthly"]["used"] == 1  # February
    clock.advance(hours=1)
    assert (await consume(app, "hana", "shell")).json["violation"]["period"] == "daily"

    clock.set(datetime(2026, 2, 1, 23, 0, tzinfo=UTC))  # Monday 00:00 local: new week
    third = await consume(app, "hana", "shell")
    assert third.code == 200
    assert third.json["periods"]["weekly"]["used"] == 1
    assert third.json["periods"]["monthly"]["used"] == 2
    clock.set(datetime(2026, 2, 2, 23, 0, tzinfo=UTC))
    fourth = await consume(app, "hana", "shell")
    assert fourth.code == 200 and fourth.json["periods"]["monthly"]["used"] == 3
    clock.set(datetime(2026, 2, 3, 23, 0, tzinfo=UTC))
    assert (await consume(app, "hana", "shell")).json["violation"]["period"] == "monthly"


@pytest.mark.gen_test
async def test_counters_and_violations_survive_a_restart(app_factory):
    app = await app_factory()
    await app.rules.set_global_limits("code", {"daily": 2}, actor="test")
    await consume(app, "ivan", "code", 2)
    assert (await consume(app, "ivan", "code")).code == 429
    await app.stop()
    again = await app_factory()
    assert await used(again, "ivan", "code") == 2
    assert await db_count(again, Violation) == 1
    resp = await consume(again, "ivan", "code")
    assert resp.code == 429 and resp.json["violation"]["attempted"] == 3
    status = await call(again, "GET", "/api/quotas/users/ivan", token=SERVICE)
    assert status.json["command_types"]["code"]["daily"]["used"] == 2


@pytest.mark.parametrize(
    ("cpu", "memory", "factor"),
    [
        (10, 10, 1.0),
        (80, 10, 0.8),
        (90, 10, 0.5),
        (95, 10, 0.25),
        (10, 85, 0.8),
        (91, 96, 0.25),  # the lower of the two bands
        (100, 100, 0.25),  # the default floor: a saturated host slows clients, refuses none
    ],
)
@pytest.mark.gen_test
async def test_throttle_factor_bands(app_factory, cpu, memory, factor):
    app = await app_factory()
    app.load.update(cpu, memory)
    resp = await consume(app, "jo", "shell")
    assert resp.code == 200
    assert resp.json["throttle_factor"] == factor


@pytest.mark.gen_test
async def test_overloaded_system_denies_without_a_violation(app_factory):
    # Only a band the operator configures to 0 refuses consumes (the defaults stop at 0.25).
    app = await app_factory(throttle__cpu_bands=[[98, 0.0], [80, 0.8]])
    app.load.update(99, 20)
    resp = await consume(app, "kim", "shell")
    assert resp.code == 503
    assert resp.json["allowed"] is False
    assert resp.json["reason"] == "system_overloaded"
    assert resp.json["throttle_factor"] == 0.0
    assert resp.headers["Retry-After"] == "5"
    assert await db_count(app, Violation) == 0
    assert await used(app, "kim") == 0
    app.load.update(50, 20)
    assert (await consume(app, "kim", "shell")).code == 200


@pytest.mark.gen_test
async def test_user_status_and_health(app_factory):
    app = await app_factory()
    await consume(app, "lee", "refactor", 7)
    status = await call(app, "GET", "/api/quotas/users/lee", token=VIEWER)
    assert status.code == 200
    assert status.json["command_types"]["refactor"]["daily"]["used"] == 7
    assert status.json["command_types"]["shell"]["daily"]["used"] == 0
    # The user's own limits, per command type; who it is and since when.
    await app.rules.set_user_limits("lee", "refactor", {"daily": 9}, actor="test")
    status = (await call(app, "GET", "/api/quotas/users/lee", token=VIEWER)).json
    daily = status["command_types"]["refactor"]["daily"]
    assert (daily["limit"], daily["used"], daily["remaining"]) == (9, 7, 2)
    assert status["command_types"]["shell"]["daily"]["limit"] != 9
    assert status["user"] == "lee" and isinstance(status["user_id"], int)
    assert status["created_at"].endswith("Z") and status["throttle_factor"] == 1.0
    missing = await call(app, "GET", "/api/quotas/users/nobody", token=SERVICE)
    assert missing.code == 404 and missing.json["error"]["code"] == "unknown_user"
    health = await call(app, "GET", "/api/health", token=None)
    assert health.code == 200
    assert health.json["database"]["reachable"] is True
    assert "version" not in health.json  # issue 12: only the authenticated health has it
    assert (await call(app, "GET", "/api/ws/health", token=VIEWER)).json["version"]


BAD_INPUTS = [
    ("not json", {"Content-Type": "application/json"}, 400, "invalid_json"),
    ('["a list"]', {"Content-Type": "application/json"}, 400, "invalid_json"),
    ('{"user": "a", "command_type": "shell"}', {"Content-Type": "text/plain"}, 415, None),
    ("{}", {}, 400, "missing_field"),
    ('{"user": "a"}', {}, 400, "missing_field"),
    ('{"user": "a", "command_type": "shell", "extra": 1}', {}, 400, "unknown_field"),
    ('{"user": 5, "command_type": "shell"}', {}, 400, "invalid_field"),
    ('{"user": "", "command_type": "shell"}', {}, 400, "invalid_field"),
    ('{"user": "   ", "command_type": "shell"}', {}, 400, "invalid_field"),
    ('{"user": "' + "x" * 65 + '", "command_type": "shell"}', {}, 400, "invalid_field"),
    ('{"user": "a\\u0000b", "command_type": "shell"}', {}, 400, "invalid_field"),
    ('{"user": "a", "command_type": 7}', {}, 400, "invalid_field"),
    ('{"user": "a", "command_type": "deploy"}', {}, 400, "unknown_command_type"),
    ('{"user": "a", "command_type": "shell", "count": 0}', {}, 400, "invalid_field"),
    ('{"user": "a", "command_type": "shell", "count": -3}', {}, 400, "invalid_field"),
    ('{"user": "a", "command_type": "shell", "count": 1.5}', {}, 400, "invalid_field"),
    ('{"user": "a", "command_type": "shell", "count": true}', {}, 400, "invalid_field"),
    ('{"user": "a", "command_type": "shell", "count": "2"}', {}, 400, "invalid_field"),
    ('{"user": "a", "command_type": "shell", "count": 99999999999}', {}, 400, "invalid_field"),
]


@pytest.mark.parametrize(
    ("raw", "headers", "status", "code"),
    BAD_INPUTS,
    ids=[raw.replace("\\", "") for raw, *_ in BAD_INPUTS],  # ids that read back as themselves
)
@pytest.mark.gen_test
async def test_bad_input_gets_a_4xx_envelope_and_writes_nothing(
    app_factory, raw, headers, status, code
):
    app = await app_factory()
    for path in ("/api/quotas/consume", "/api/quotas/check"):
        resp = await call(app, "POST", path, raw=raw, headers=headers, token=SERVICE)
        assert resp.code == status, resp
        error = resp.json["error"]
        assert set(error) == {"code", "message"}
        if code:
            assert error["code"] == code
    assert await db_count(app, User) == 0
    assert await db_count(app, Usage) == 0
    assert await db_count(app, Event) == 0


@pytest.mark.gen_test
async def test_oversized_body_is_refused(app_factory):
    app = await app_factory(server__max_body_size=4096)
    raw = '{"user": "a", "command_type": "shell", "pad": "' + "x" * 10000 + '"}'
    resp = await call(app, "POST", "/api/quotas/consume", raw=raw, token=SERVICE)
    assert resp.code == 413
    assert resp.json["error"]["code"] == "payload_too_large"
    assert await db_count(app, User) == 0


@pytest.mark.gen_test
async def test_unknown_command_status_is_configurable(app_factory):
    app = await app_factory(quotas__unknown_command_status=422)
    resp = await consume(app, "a", "deploy")
    assert resp.code == 422
    assert resp.json["error"] == {
        "code": "unknown_command_type",
        "message": "unknown command type 'deploy'",
    }


@pytest.mark.gen_test
async def test_an_unknown_command_type_is_a_400_by_default(app_factory):
    app = await app_factory()
    for path in ("/api/quotas/consume", "/api/quotas/check"):
        resp = await call(app, "POST", path, {"user": "a", "command_type": "deploy"})
        assert (resp.code, resp.json["error"]["code"]) == (400, "unknown_command_type"), path


@pytest.mark.gen_test
async def test_unknown_route_and_method_are_json(app_factory):
    app = await app_factory()
    missing = await call(app, "GET", "/api/nothing-here")
    assert missing.code == 404 and missing.json["error"]["code"] == "not_found"
    wrong = await call(app, "GET", "/api/quotas/consume", token=SERVICE)
    assert wrong.code == 405 and "error" in wrong.json


@pytest.mark.gen_test(timeout=30)
async def test_the_in_process_check_asks_about_one_command_by_default(app_factory):
    """What plugins call: ``app.quota.check(user, type)`` is about one more command."""
    from quotaserver.quota import UnknownCommandType

    app = await app_factory(quotas__defaults={"shell": {"daily": 3}})
    assert (await consume(app, "pia", "shell", 2)).code == 200
    decision = await app.quota.check("pia", "shell")
    assert decision.allowed and decision.count == 1
    assert not (await app.quota.check("pia", "shell", 2)).allowed
    assert UnknownCommandType("nope").status == 400  # unless quotas.unknown_command_status
