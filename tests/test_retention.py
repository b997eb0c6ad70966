"""Retention: old rows pruned in batches off the loop; pruned cursors get recovered: false."""

from __future__ import annotations

import asyncio
import json

import pytest
from clients import consume, sse_connect, ws_connect
from conftest import FakeClock

from quotaserver import retention
from quotaserver.events import events_after, events_since
from quotaserver.models import Activity, Event, Violation, aware, naive_utc
from quotaserver.windows import isoformat


def counts() -> dict[str, int]:
    return {
        "events": Event.select().count(),
        "violations": Violation.select().count(),
        "activity": Activity.select().count(),
    }


async def deny(app, user: str, n: int) -> None:
    for _ in range(n):
        assert (await consume(app, user)).code == 429


@pytest.mark.gen_test(timeout=60)
async def test_rows_older_than_each_retention_are_pruned_in_batches(app_factory):
    clock = FakeClock()
    app = await app_factory(
        clock=clock,
        retention__events_days=30,
        retention__violations_days=60,
        retention__activity_days=10,
        retention__batch_size=2,  # several batches per table
    )
    await app.rules.set_global_limits("shell", {"daily": 0}, "test")  # one event
    await deny(app, "old", 4)  # 4 violations and events (5 would raise an alert too)
    clock.advance(days=45)
    await deny(app, "middle", 3)
    clock.advance(days=20)  # "old" is 65 days old, "middle" 20
    await deny(app, "new", 2)
    assert await app.store.run(counts) == {"events": 10, "violations": 9, "activity": 3}

    deleted = await retention.prune(app)
    assert deleted == {"events": 5, "violations": 4, "activity": 2, "idempotency_keys": 0}
    left = await app.store.run(counts)
    assert left == {"events": 5, "violations": 5, "activity": 1}
    users = await app.store.run(lambda: sorted({v.user.username for v in Violation.select()}))
    assert users == ["middle", "new"]


@pytest.mark.gen_test(timeout=60)
async def test_the_newest_event_is_kept_whatever_its_age(app_factory):
    clock = FakeClock()
    app = await app_factory(clock=clock, retention__events_days=1)
    await app.rules.set_global_limits("shell", {"daily": 0}, "test")
    await deny(app, "ann", 3)
    newest = app.hub.last_seq
    clock.advance(days=5)
    await retention.prune(app)
    assert await app.store.run(lambda: [e.id for e in Event.select()]) == [newest]
    # New events continue after it: ids are never handed out twice.
    await deny(app, "ann", 1)
    assert app.hub.last_seq == newest + 1


@pytest.mark.gen_test(timeout=120)
async def test_consumes_are_answered_while_a_large_backlog_is_pruned(app_factory):
    clock = FakeClock()
    app = await app_factory(clock=clock, retention__events_days=1, retention__batch_size=50)
    old = naive_utc(clock())

    def backlog() -> None:
        rows = [{"type": "test", "data": "{}", "created_at": old} for _ in range(6000)]
        for start in range(0, len(rows), 500):
            Event.insert_many(rows[start : start + 500]).execute()

    await app.store.run(backlog)
    clock.advance(days=3)
    pruning = asyncio.ensure_future(retention.prune(app))
    answered = []
    for i in range(5):
        resp = await consume(app, f"u{i}")
        assert resp.code == 200
        answered.append(pruning.done())
    # Batches leave the database thread free between them: every consume above was
    # answered while pruning was still going on.
    assert answered == [False] * 5
    assert (await pruning)["events"] == 5999  # the newest row stays


@pytest.mark.gen_test(timeout=60)
async def test_a_cursor_older_than_what_is_kept_gets_recovered_false_pruned(app_factory):
    clock = FakeClock()
    # No ring: replays come from the event log, as after a restart.
    app = await app_factory(clock=clock, retention__events_days=30, realtime__ring_size=0)
    await app.rules.set_global_limits("shell", {"daily": 0}, "test")
    first = app.hub.last_seq
    await deny(app, "old", 2)
    clock.advance(days=40)
    await deny(app, "new", 2)
    await retention.prune(app)
    kept = await app.store.run(lambda: [e.id for e in Event.select().order_by(Event.id)])
    assert kept == [app.hub.last_seq - 1, app.hub.last_seq]

    ws = await ws_connect(app, f"last_seq={first}")
    recovered = (await ws.recv_type("recovered"))["data"]
    assert recovered == {
        "recovered": False,
        "missed": None,
        "seq": app.hub.last_seq,
        "reason": "pruned",
    }
    sse = await sse_connect(app, headers={"Last-Event-ID": str(first)})
    event = await sse.next_type("recovered")
    assert json.loads(event["data"])["data"]["reason"] == "pruned"
    # A cursor just before the oldest kept event replays normally.
    ws2 = await ws_connect(app, f"last_seq={kept[0] - 1}")
    replayed = [await ws2.recv_type("violation") for _ in kept]
    assert [m["seq"] for m in replayed] == kept
    # As stored: the data, and the time the event happened (not the time of the replay).
    stored = await app.store.run(
        lambda: {e.id: (e.payload(), isoformat(aware(e.created_at))) for e in Event.select()}
    )
    assert [(m["data"], m["timestamp"]) for m in replayed] == [stored[seq] for seq in kept]
    assert (await ws2.recv_type("recovered"))["data"]["recovered"] is True
    # Two before the oldest kept: the event right after the cursor is gone, a gap.
    ws3 = await ws_connect(app, f"last_seq={kept[0] - 2}")
    assert (await ws3.recv_type("recovered"))["data"] == {
        "recovered": False,
        "missed": None,
        "seq": app.hub.last_seq,
        "reason": "pruned",
    }


@pytest.mark.gen_test(timeout=60)
async def test_the_event_log_reads_at_most_the_limit_oldest_first(app_factory):
    app = await app_factory(realtime__ring_size=0)
    await app.rules.set_global_limits("shell", {"daily": 0}, "test")
    await deny(app, "reader", 5)
    ids = await app.store.run(lambda: [e.id for e in Event.select().order_by(Event.id)])
    assert len(ids) >= 5
    first = ids[0] - 1
    for read in (events_after, events_since):
        got = await app.store.read(lambda r=read: [m.seq for m in r(first, 3)])
        assert got == ids[:3], read.__name__
        got = await app.store.read(lambda r=read: [m.seq for m in r(ids[-2], 10)])
        assert got == ids[-1:], read.__name__
