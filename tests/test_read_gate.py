"""Admin reads take turns (quotaserver.read_gate): however many admins page at once, one
admin read runs at a time, every request is answered, and a failed read frees the gate."""

from __future__ import annotations

import asyncio
import threading

import pytest
from clients import call, consume

from quotaserver.admin_queries import AdminQueries
from quotaserver.read_gate import GateTimeout, ReadGate

API = "/api/admin/quotas"


@pytest.mark.gen_test(timeout=60)
async def test_concurrent_admin_pages_run_one_at_a_time(app_factory, monkeypatch):
    app = await app_factory()
    for i in range(30):
        assert (await consume(app, f"user{i:02d}", "shell", i % 5 + 1)).code == 200
    running, most, calls = 0, 0, 0
    lock = threading.Lock()
    overlapped = threading.Event()
    users_sync = AdminQueries._users_sync

    def counted(self, *args):
        nonlocal running, most, calls
        with lock:
            running += 1
            calls += 1
            first = calls == 1
            most = max(most, running)
            if running > 1:
                overlapped.set()
        try:
            if first:
                # Hold the first read until a second one runs beside it (without the gate it
                # does at once: the other eleven requests are already in), or 1 s.
                overlapped.wait(1.0)
            return users_sync(self, *args)
        finally:
            with lock:
                running -= 1

    monkeypatch.setattr(AdminQueries, "_users_sync", counted)
    paths = [f"{API}/users?per_page=5&sort={s}&page={p}" for s in ("username", "utilization")
             for p in (1, 2, 3, 4, 5, 6)]  # fmt: skip
    answers = await asyncio.gather(*(call(app, "GET", path) for path in paths))
    assert [a.code for a in answers] == [200] * len(paths)
    assert sorted(u["username"] for a in answers[:6] for u in a.json["items"]) == [
        f"user{i:02d}" for i in range(30)
    ]
    assert most == 1


@pytest.mark.gen_test
async def test_a_failed_read_frees_the_gate_and_the_next_read_runs():
    gate = ReadGate()
    order: list[str] = []

    async def fails() -> None:
        order.append("fails")
        raise RuntimeError("boom")

    async def works() -> str:
        order.append("works")
        return "ok"

    with pytest.raises(RuntimeError):
        await gate.run(fails)
    assert await gate.run(works) == "ok"
    results = await asyncio.gather(gate.run(works), gate.run(works))
    assert results == ["ok", "ok"] and order == ["fails", "works", "works", "works"]


@pytest.mark.gen_test
async def test_a_read_queued_behind_a_hung_one_gives_up_instead_of_piling_up():
    gate = ReadGate()
    release = asyncio.Event()

    async def hangs() -> str:
        await release.wait()
        return "late"

    async def quick() -> str:
        return "ok"

    first = asyncio.ensure_future(gate.run(hangs))
    await asyncio.sleep(0)  # the hung read holds the turn
    with pytest.raises(GateTimeout):
        await gate.run(quick, wait=0.05)
    release.set()
    assert await first == "late"
    assert await gate.run(quick, wait=5) == "ok"  # the turn comes back after the rest


@pytest.mark.gen_test(timeout=30)
async def test_the_charts_history_reads_take_the_same_gate(app_factory):
    app = await app_factory()
    turns = []
    run = app.read_gate.run

    async def counted(read, wait=None):
        turns.append(1)
        return await run(read, wait)

    app.read_gate.run = counted
    for path in ("/history?minutes=60", "/violations/daily", "/users"):
        assert (await call(app, "GET", f"{API}{path}")).code == 200
    assert len(turns) == 3
