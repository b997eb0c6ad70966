"""Idempotency keys across a kill -9 (SQLite) and across two instances on one PostgreSQL."""

from __future__ import annotations

import asyncio
import signal

import pytest
from clients import ADMIN, SERVICE, call
from conftest import TOKENS
from services import start_server


async def keyed(server, key, user="alice", count=1, token=ADMIN):
    body = {"user": user, "command_type": "shell", "count": count}
    return await call(
        server, "POST", "/api/quotas/consume", body, token=token, headers={"Idempotency-Key": key}
    )


async def daily_used(server, user="alice", token=ADMIN) -> int:
    status = await call(server, "GET", f"/api/quotas/users/{user}", token=token)
    assert status.code == 200, status
    return status.json["command_types"]["shell"]["daily"]["used"]


async def start_sqlite(cwd):
    env = {
        "QUOTASERVER_ADMIN_TOKEN": ADMIN,
        "QUOTASERVER_THROTTLE_SOURCE": "off",
        "QUOTASERVER_SERVER_LOG_LEVEL": "warning",
    }
    return await start_server(str(cwd), {}, env=env)


@pytest.mark.gen_test(timeout=120)
async def test_a_keyed_consume_acknowledged_before_kill_9_is_not_counted_again(tmp_path):
    server = await start_sqlite(tmp_path)
    try:
        first = await keyed(server, "before-crash", count=7)
        assert first.code == 200
        server.send_signal(signal.SIGKILL)  # right after the answer: no shutdown of any kind
        await server.wait()
        server = await start_sqlite(tmp_path)
        retry = await keyed(server, "before-crash", count=7)
        assert retry.code == 200 and retry.headers["Idempotent-Replayed"] == "true"
        assert retry.body == first.body
        assert await daily_used(server) == 7
        # The refund survives the restart too: it finds the consume by its key.
        given = await call(
            server, "POST", "/api/quotas/refund",
            {"user": "alice", "command_type": "shell", "key": "before-crash"},
        )  # fmt: skip
        assert given.code == 200 and given.json["count"] == 7
        assert await daily_used(server) == 0
    finally:
        server.kill()
        await server.wait()


@pytest.mark.gen_test(timeout=180)
async def test_two_instances_on_one_postgresql_replay_each_others_keys(pg, tmp_path):
    config = {
        "database": {"url": pg.create_database(), "pool_size": 8},
        "auth": {"tokens": TOKENS, "token_file": str(tmp_path / "admin_token")},
        "throttle": {"cpu_bands": [[100, 1.0]], "memory_bands": [[100, 1.0]]},
        "plugins": {"system_metrics": {"enabled": False}},
        "server": {"log_level": "warning"},
    }
    a = await start_server(str(tmp_path), config)
    b = await start_server(str(tmp_path), config)
    try:
        first = await keyed(a, "across", count=2, token=SERVICE)
        assert first.code == 200
        on_b = await keyed(b, "across", count=2, token=SERVICE)
        assert on_b.code == 200 and on_b.headers["Idempotent-Replayed"] == "true"
        assert on_b.body == first.body
        assert (await keyed(b, "across", count=3, token=SERVICE)).code == 422
        # One key sent to both instances at once, many times: counted exactly once.
        answers = await asyncio.gather(
            *(keyed(server, "race", user="bob", token=SERVICE) for server in [a, b] * 10)
        )
        assert {r.code for r in answers} <= {200, 409}, answers
        fresh = [r for r in answers if r.code == 200 and "Idempotent-Replayed" not in r.headers]
        assert len(fresh) == 1, answers
        assert all(r.body == fresh[0].body for r in answers if r.code == 200)
        assert await daily_used(a, "bob", SERVICE) == 1
        # A refund made on one instance is answered the same on the other, and given once.
        body = {"user": "alice", "command_type": "shell", "key": "across"}
        given = await call(b, "POST", "/api/quotas/refund", body, token=SERVICE)
        again = await call(a, "POST", "/api/quotas/refund", body, token=SERVICE)
        assert given.code == 200 and again.body == given.body
        assert again.headers["Idempotent-Replayed"] == "true"
        assert await daily_used(a, "alice", SERVICE) == 0
    finally:
        for server in (a, b):
            server.kill()
            await server.wait()
