"""Admin, history and replay reads never queue behind (or block) the consume path."""

from __future__ import annotations

import asyncio
import threading

import pytest
from clients import ADMIN, call, consume

from quotaserver.models import User


def _held_read(started: threading.Event, release: threading.Event) -> int:
    """A slow admin read: it holds its snapshot open until released."""
    count = User.select().count()
    started.set()
    release.wait(30)
    return count


async def _consumes_finish_while_a_read_is_held(app) -> None:
    assert (await consume(app, "before")).code == 200
    started, release = threading.Event(), threading.Event()
    held = asyncio.ensure_future(app.store.read(_held_read, started, release))
    try:
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        assert started.is_set() and not held.done()
        results = await asyncio.gather(*(consume(app, f"u{i}") for i in range(20)))
        assert [r.code for r in results] == [200] * 20
        # Another admin page is served meanwhile too (the read pool has more than one).
        page = await call(app, "GET", "/api/admin/quotas/users?sort=utilization", token=ADMIN)
        assert page.code == 200 and page.json["total"] == 21
        assert not held.done()  # all of that happened while the slow read was still open
    finally:
        release.set()
    assert await held == 1  # its snapshot predates the 20 new users


@pytest.mark.gen_test(timeout=60)
async def test_a_held_admin_read_does_not_delay_consumes_on_sqlite(app_factory):
    await _consumes_finish_while_a_read_is_held(await app_factory())


@pytest.mark.gen_test(timeout=60)
async def test_reads_cannot_write(app_factory):
    app = await app_factory()

    def sneaky() -> None:
        User.create(username="sneaky", created_at=app.clock().replace(tzinfo=None))

    with pytest.raises(Exception, match="readonly|read-only|read only"):
        await app.store.read(sneaky)
    assert (await call(app, "GET", "/api/admin/quotas/users?search=sneaky")).json["total"] == 0


@pytest.mark.gen_test(timeout=60)
async def test_a_held_admin_read_does_not_delay_consumes_on_postgresql(app_factory, pg):
    app = await app_factory(database__url=pg.create_database(), database__pool_size=4)
    await _consumes_finish_while_a_read_is_held(app)
