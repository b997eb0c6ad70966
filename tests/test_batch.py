"""POST /api/quotas/consume/batch over real HTTP against a real SQLite file: many decisions in
one transaction, each answered as its single consume would be."""

from __future__ import annotations

import asyncio

import pytest
from clients import SERVICE, call, consume, settle, ws_connect
from scrape import scrape, value
from waits import wait_until

from quotaserver.models import Event, Usage, Violation

BATCH = "/api/quotas/consume/batch"
LIMITS = {"shell": {"daily": 50, "weekly": 1000, "monthly": 1000}}


async def batch(app, decisions, token=SERVICE):
    return await call(app, "POST", BATCH, {"decisions": decisions}, token=token)


async def rows(app, model, *where) -> int:
    def count():
        query = model.select()
        return (query.where(*where) if where else query).count()

    return await app.store.run(count)


async def daily_used(app) -> int:
    def total():
        return sum(u.used for u in Usage.select().where(Usage.period == "daily"))

    return await app.store.run(total)


@pytest.mark.gen_test(timeout=60)
async def test_concurrent_batches_admit_exactly_the_limit_and_record_every_refusal(app_factory):
    app = await app_factory(quotas__defaults=LIMITS)
    watcher = await ws_connect(app, "types=violation")
    await watcher.recv_type("welcome")
    decisions = [{"user": "carol", "command_type": "shell"}] * 20
    answers = await asyncio.gather(*(batch(app, decisions) for _ in range(10)))
    assert {a.code for a in answers} == {200}
    results = [r for a in answers for r in a.json["results"]]
    assert len(results) == 200
    admitted = [r for r in results if r["allowed"]]
    refused = [r for r in results if not r["allowed"]]
    assert len(admitted) == 50 and len(refused) == 150
    assert {r["status"] for r in admitted} == {200} and {r["status"] for r in refused} == {429}
    assert all(r["violation"]["period"] == "daily" for r in refused)
    assert await daily_used(app) == 50
    assert await rows(app, Violation) == 150
    assert await rows(app, Event, Event.type == "violation") == 150
    # Every refusal is published once the batch has committed, in seq order.
    seqs = [(await watcher.recv_type("violation", timeout=15))["seq"] for _ in range(150)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 150
    assert app.hub.sequencer.backfilled == 0  # published live, not found later in the log


@pytest.mark.gen_test(timeout=60)
async def test_each_item_gets_its_own_answer_in_order(app_factory):
    app = await app_factory(quotas__defaults=LIMITS)
    assert (await consume(app, "dave", "shell", 49)).code == 200
    answer = await batch(
        app,
        [
            {"user": "erin", "command_type": "shell", "count": 3},
            {"user": "dave", "command_type": "shell", "count": 2},  # 51 > 50: refused
            {"user": "dave", "command_type": "shell"},  # 50: fits
            {"user": "frank", "command_type": "code"},
        ],
    )
    assert answer.code == 200, answer
    erin, dave_over, dave_fits, frank = answer.json["results"]
    assert (erin["user"], erin["status"], erin["periods"]["daily"]["used"]) == ("erin", 200, 3)
    assert dave_over["status"] == 429 and dave_over["reason"] == "quota_exceeded"
    assert dave_over["violation"]["attempted"] == 51
    assert dave_fits["status"] == 200 and dave_fits["periods"]["daily"]["remaining"] == 0
    assert frank["command_type"] == "code" and frank["allowed"] is True
    # The same answers as single consumes: the next single one for dave is refused.
    assert (await consume(app, "dave", "shell")).code == 429


@pytest.mark.gen_test(timeout=60)
async def test_items_with_keys_count_once_across_retries_and_single_consumes(app_factory):
    app = await app_factory(quotas__defaults=LIMITS)
    decisions = [
        {"user": "gina", "command_type": "shell", "count": 2, "key": "job-1"},
        {"user": "gina", "command_type": "shell", "count": 3, "key": "job-2"},
    ]
    first = await batch(app, decisions)
    again = await batch(app, decisions)  # the retry of a batch whose answer was lost
    assert [r["periods"]["daily"]["used"] for r in first.json["results"]] == [2, 5]
    assert all(r.get("replayed") for r in again.json["results"])
    assert [r["periods"]["daily"]["used"] for r in again.json["results"]] == [2, 5]
    assert await daily_used(app) == 5
    # A single consume retried with an item's key gets the item's answer.
    single = await call(
        app, "POST", "/api/quotas/consume",
        {"user": "gina", "command_type": "shell", "count": 2},
        token=SERVICE, headers={"Idempotency-Key": "job-1"},
    )  # fmt: skip
    assert single.code == 200 and single.headers["Idempotent-Replayed"] == "true"
    # A key reused for another item is that item's 422; the rest of the batch is decided.
    mixed = await batch(
        app,
        [
            {"user": "gina", "command_type": "shell", "count": 7, "key": "job-2"},
            {"user": "gina", "command_type": "shell", "count": 1, "key": "job-3"},
            {"user": "gina", "command_type": "shell", "count": 1, "key": "job-3"},  # a repeat
        ],
    )
    reused, fresh, repeat = mixed.json["results"]
    assert reused["status"] == 422 and reused["error"]["code"] == "idempotency_key_reused"
    assert fresh["status"] == 200 and fresh["periods"]["daily"]["used"] == 6
    assert repeat["replayed"] is True and repeat["periods"]["daily"]["used"] == 6
    assert await daily_used(app) == 6


@pytest.mark.gen_test(timeout=60)
async def test_a_bad_item_refuses_the_whole_batch_and_counts_nothing(app_factory):
    app = await app_factory(quotas__defaults=LIMITS)
    good = {"user": "hank", "command_type": "shell"}
    cases = [
        ([good, {"user": "", "command_type": "shell"}], 400, "invalid_field", "decisions[1]:"),
        ([good, {"user": "hank", "command_type": "nope"}], 400, "unknown_command_type", "[1]"),
        ([good, "hank"], 400, "invalid_field", "decisions[1]: each decision"),
        ([{"user": "hank", "command_type": "shell", "extra": 1}], 400, "unknown_field", "[0]"),
        ([good, {**good, "count": 0}], 400, "invalid_field", "decisions[1]: count"),
        ([good, {**good, "user": "ha\u0001nk"}], 400, "invalid_field", "control characters"),
        ([good, {**good, "user": "ha\x7fnk"}], 400, "invalid_field", "control characters"),
        ([good] * 501, 400, "invalid_field", "at most 500"),
        ([], 400, "invalid_field", "non-empty"),
    ]
    for decisions, status, code, words in cases:
        answer = await batch(app, decisions)
        assert answer.code == status, (decisions[:3], answer)
        assert answer.json["error"]["code"] == code and words in answer.json["error"]["message"]
    assert (await call(app, "POST", BATCH, {"decisions": "x"}, token=SERVICE)).code == 400
    assert await daily_used(app) == 0 and await rows(app, Violation) == 0


@pytest.mark.gen_test(timeout=60)
async def test_batch_decisions_are_counted_like_single_ones(app_factory):
    """In /metrics and in the per-minute activity of the dashboard's history."""
    app = await app_factory(quotas__defaults={"shell": {"daily": 3}})
    before = await scrape(app)
    decisions = [{"user": "hal", "command_type": "shell", "count": 2}] * 3  # 2 + 2 > 3
    results = (await batch(app, decisions)).json["results"]
    assert [r["status"] for r in results] == [200, 429, 429]
    await settle(app)
    after = await scrape(app)
    for result, n in (("allowed", 1), ("denied", 2)):
        name = "quotaserver_decisions_total"
        assert value(after, name, result=result) - before.get((name, (("result", result),)), 0) == n
    history = (await call(app, "GET", "/api/admin/quotas/history?minutes=5")).json
    assert sum(p["commands"] for p in history["activity"]) == 2


@pytest.mark.gen_test(timeout=60)
async def test_an_overloaded_batch_counts_nothing_and_keeps_no_key(app_factory):
    app = await app_factory(quotas__defaults=LIMITS, throttle__cpu_bands=[[90, 0.0]])
    app.load.update(95, 10)
    decisions = [
        {"user": "ida", "command_type": "shell", "count": 2, "key": "k-1"},
        {"user": "ida", "command_type": "shell", "count": 1},
    ]
    shed = (await batch(app, decisions)).json["results"]
    assert [(r["status"], r["allowed"], r["reason"]) for r in shed] == [
        (503, False, "system_overloaded")
    ] * 2
    assert [(r["user"], r["command_type"], r["count"], r["throttle_factor"]) for r in shed] == [
        ("ida", "shell", 2, 0.0),
        ("ida", "shell", 1, 0.0),
    ]
    assert await daily_used(app) == 0 and await rows(app, Violation) == 0
    app.load.update(10, 10)
    again = (await batch(app, decisions)).json["results"]  # decided afresh, not replayed
    assert [(r["status"], r.get("replayed", False)) for r in again] == [(200, False)] * 2
    assert [r["periods"]["daily"]["used"] for r in again] == [2, 3]


@pytest.mark.gen_test(timeout=90)
async def test_a_batch_decides_exactly_as_the_same_single_consumes_in_order(app_factory, tmp_path):
    """The oracle is the single consume: one app takes a batch, another (its own database)
    the same decisions one by one; every answer, counter, peak and violation agrees."""
    import random

    from quotaserver.models import Activity, DailyPeak

    defaults = {"shell": {"daily": 12, "weekly": 20}, "code": {"daily": 9, "weekly": None}}
    apps = [
        await app_factory(quotas__defaults=defaults),
        await app_factory(
            quotas__defaults=defaults, database__url=f"sqlite:///{tmp_path}/single.db"
        ),
    ]
    for app in apps:
        await consume(app, "olga", "shell", 12)  # at the daily limit already
        await app.rules.set_user_limits("pete", "code", {"daily": 3, "weekly": 4}, actor="t")
        await app.rules.set_user_limits("olga", "code", {"daily": None}, actor="t")
    rng = random.Random(7)
    users = ["olga", "pete", "rosa", "stan", "tina"]
    decisions = [
        {"user": rng.choice(users), "command_type": rng.choice(["shell", "code"]),
         "count": rng.choice([1, 1, 2, 5, 13])}
        for _ in range(150)
    ]  # fmt: skip
    batched = (await batch(apps[0], decisions)).json["results"]
    singles = [
        (await consume(apps[1], d["user"], d["command_type"], d["count"])).json for d in decisions
    ]
    assert len(batched) == len(singles) == 150
    for item, single in zip(batched, singles, strict=True):
        assert item.pop("status") == (200 if single["allowed"] else 429)
        assert item == single
    assert {r["allowed"] for r in batched} == {True, False}

    def state():
        return (
            sorted((u.user.username, u.command_type, u.period, u.used) for u in Usage.select()),
            sorted((p.username, p.day, p.rank) for p in DailyPeak.select()),
            sorted(
                (v.user.username, v.command_type, v.period, v.attempted) for v in Violation.select()
            ),
            sum(a.commands for a in Activity.select()),
            sum(a.violations for a in Activity.select()),
        )

    await settle(apps[0])
    await settle(apps[1])
    assert await apps[0].store.run(state) == await apps[1].store.run(state)

    # And the plugins were told the same decisions (the analytics' figures).
    def figures(app) -> dict:
        snapshot = app.stats_snapshot()
        return {k: snapshot[k] for k in ("total_users", "commands_today", "violations_today")}

    await wait_until(lambda: figures(apps[0]) == figures(apps[1]), "the same figures")
    assert figures(apps[0])["total_users"] == len(users)
    assert figures(apps[0])["commands_today"] == 12 + sum(
        r["count"] for r in batched if r["allowed"]
    )


@pytest.mark.gen_test(timeout=60)
async def test_a_batch_with_keys_answers_with_the_throttle_factor_it_was_decided_under(
    app_factory,
):
    app = await app_factory(quotas__defaults=LIMITS, throttle__cpu_bands=[[90, 0.5]])
    app.load.update(95, 10)
    decisions = [
        {"user": "jo", "command_type": "shell", "key": "j-1"},
        {"user": "jo", "command_type": "shell", "count": 2},  # no key, in a keyed batch
    ]
    results = (await batch(app, decisions)).json["results"]
    assert [(r["status"], r["throttle_factor"]) for r in results] == [(200, 0.5), (200, 0.5)]
    assert [r["periods"]["daily"]["used"] for r in results] == [1, 3]
