"""Several real quotaserver processes on one PostgreSQL database and one Redis backplane.

Every test starts its own servers (``run.py`` subprocesses) on a fresh database of a
PostgreSQL cluster and a ``redis-server`` started for this module.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
from clients import (
    ADMIN,
    VIEWER,
    call,
    consume,
    cookies_of,
    login,
    session_headers,
    sse_connect,
    ws_connect,
)
from conftest import TOKENS
from services import INITDB, REDIS, ROOT, Redis, needs, start_server, write_config

from quotaserver.migrations import SCHEMA_VERSION

pytestmark = needs(
    INITDB is not None and REDIS is not None,
    reason="needs PostgreSQL server binaries and redis-server (.ci/run installs them)",
)

LIMIT = 200
SECRET = "cluster-test-secret-0123456789abcdef"  # backplane.secret of every instance


@pytest.fixture(scope="module")
def redis_server():
    server = Redis()
    server.start()
    yield server
    server.kill()


@pytest.fixture
def cluster(pg, redis_server, tmp_path, io_loop):
    """``servers = await cluster(2)``: N instances on a fresh database and the backplane."""
    db_url = pg.create_database()
    started = []

    async def start(
        count: int = 2, *args: str, database: str | None = None, at_once: bool = False, **extra
    ) -> list:
        config = {
            "dev": True,
            "database": {
                "url": database or db_url,
                "pool_size": 8,
                "connect_timeout": 1.0,
                "statement_timeout": 2.0,
            },
            "backplane": {
                "url": redis_server.url,
                "channel": f"qs-{os.path.basename(db_url)}",
                "secret": SECRET,
            },
            "auth": {"tokens": TOKENS, "token_file": str(tmp_path / "admin_token")},
            "realtime": {"stats_interval": 0.2, "heartbeat_interval": 1.0},
            # The real processes sample this machine: a busy test machine must not throttle.
            "throttle": {"cpu_bands": [[100, 1.0]], "memory_bands": [[100, 1.0]]},
            "quotas": {
                "defaults": {"shell": {"daily": LIMIT, "weekly": 100_000, "monthly": 100_000}}
            },
            "plugins": {"system_metrics": {"enabled": False}},
        }
        for section, values in extra.items():
            config.setdefault(section, {}).update(values)
        start.config = config
        if at_once:  # every process starts before any is listening
            starting = [start_server(str(tmp_path), config, *args) for _ in range(count)]
            outcomes = await asyncio.gather(*starting, return_exceptions=True)
            started.extend(o for o in outcomes if not isinstance(o, BaseException))
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            return list(outcomes)
        servers = []
        for _ in range(count):
            server = await start_server(str(tmp_path), config, *args)
            started.append(server)
            servers.append(server)
        return servers

    start.db_url = db_url
    yield start
    for server in started:
        server.kill()
        if server.proc.returncode is None:
            io_loop.run_sync(server.proc.wait, timeout=10)


async def violate(server, user: str = "mallory", extra: int = 0) -> tuple[str, int]:
    """A consume refused for asking ``LIMIT + 1 + extra``; returns (user, attempted), which
    identifies its violation event."""
    response = await consume(server, user, "shell", LIMIT + 1 + extra)
    assert response.code == 429, response
    return user, response.json["violation"]["attempted"]


def ident(message: dict) -> tuple[str, int]:
    return message["data"]["username"], message["data"]["attempted"]


async def violations(ws, n: int) -> list[dict]:
    return [await ws.recv_type("violation", timeout=15) for _ in range(n)]


async def wait_for(predicate, what: str, timeout: float = 20.0):
    """Poll an async predicate until it returns a truthy value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def scalar(db_url: str, sql: str) -> int:
    import psycopg2

    with psycopg2.connect(db_url) as conn, conn.cursor() as cur:
        cur.execute(sql)
        return cur.fetchone()[0]


@pytest.mark.gen_test(timeout=120)
async def test_a_violation_on_one_instance_reaches_ws_and_sse_clients_on_another(cluster):
    a, b = await cluster(2)
    ws_b = await ws_connect(b, "types=violation")
    welcome = await ws_b.recv_type("welcome")
    ws_a = await ws_connect(a, "types=violation")
    assert (await ws_a.recv_type("welcome"))["data"]["instance"] != welcome["data"]["instance"]
    sse_b = await sse_connect(b, "types=violation")
    await sse_b.next_type("welcome")
    await violate(a)
    on_b = await ws_b.recv_type("violation")
    on_a = await ws_a.recv_type("violation")
    streamed = await sse_b.next_type("violation", timeout=15)
    assert on_b["data"]["username"] == "mallory"
    assert on_b["seq"] == on_a["seq"] == int(streamed["id"]) == streamed["message"]["seq"]
    health = (await call(b, "GET", "/api/ws/health", token=VIEWER)).json
    assert health["backplane"]["kind"] == "redis" and health["backplane"]["connected"]
    assert health["backplane"]["received"] >= 1 and health["status"] == "ok"


@pytest.mark.gen_test(timeout=120)
async def test_a_live_only_event_reaches_every_instance_once(cluster):
    """The analytics' `usage` events are live-only (no seq, never stored): they travel on the
    backplane's live channel, and the sending instance does not deliver its own twice."""
    a, b = await cluster(2)
    ws_a, ws_b = await ws_connect(a, "types=usage"), await ws_connect(b, "types=usage")
    for ws in (ws_a, ws_b):
        await ws.recv_type("welcome")

    def rows(message):
        return [(r["username"], r["command_type"], r["used"]) for r in message["data"]["users"]]

    assert (await consume(a, "livia", "shell", 3)).code == 200
    on_b = await ws_b.recv_type("usage", timeout=15)
    on_a = await ws_a.recv_type("usage", timeout=15)
    assert rows(on_b) == rows(on_a) == [("livia", "shell", 3)]
    assert "seq" not in on_b and on_b["timestamp"] == on_a["timestamp"]

    # And the other way. Redis keeps one channel's order for a subscriber: an echo of A's
    # own event would have reached A before B's.
    assert (await consume(b, "bruno", "shell", 2)).code == 200
    while True:
        message = await ws_a.recv_type("usage", timeout=15)
        if ("bruno", "shell", 2) in rows(message):
            break
    seen = [row for m in ws_a.messages if m["type"] == "usage" for row in rows(m)]
    assert seen.count(("livia", "shell", 3)) == 1, seen
    assert ("bruno", "shell", 2) in rows(await ws_b.recv_type("usage", timeout=15))


@pytest.mark.gen_test(timeout=180)
async def test_300_consumes_across_two_instances_admit_exactly_the_limit(cluster):
    a, b = await cluster(2)
    watchers = [await ws_connect(s, "types=violation") for s in (a, b)]
    for ws in watchers:
        await ws.recv_type("welcome")
    results = await asyncio.gather(
        *(consume(a if i % 2 else b, "bob", "shell") for i in range(300))
    )
    codes = [r.code for r in results]
    assert codes.count(200) == LIMIT and codes.count(429) == 100
    assert scalar(cluster.db_url, "SELECT count(*) FROM violation") == 100
    used = scalar(cluster.db_url, "SELECT used FROM usage WHERE period = 'daily'")
    assert used == LIMIT
    for ws in watchers:  # every instance's clients get all 100, once each, in seq order
        seqs = [m["seq"] for m in await violations(ws, 100)]
        assert seqs == sorted(seqs) and len(set(seqs)) == 100


@pytest.mark.gen_test(timeout=120)
async def test_a_client_moving_from_one_instance_to_another_recovers_what_it_missed(cluster):
    a, b = await cluster(2)
    ws = await ws_connect(a, "types=violation")
    await ws.recv_type("welcome")
    await violate(a, "carol")
    last = (await ws.recv_type("violation"))["seq"]
    ws.close()
    missed = [await violate(a if i % 2 else b, "carol", i) for i in range(4)]
    resumed = await ws_connect(b, f"types=violation&last_seq={last}")
    await resumed.recv_type("welcome")
    replayed = [await resumed.recv() for _ in range(5)]
    assert [m["type"] for m in replayed] == ["violation"] * 4 + ["recovered"]
    assert [ident(m) for m in replayed[:4]] == missed
    seqs = [m["seq"] for m in replayed[:4]]
    assert seqs == sorted(seqs) and seqs[0] > last
    assert replayed[4]["data"]["recovered"] is True and replayed[4]["data"]["missed"] == 4


@pytest.mark.gen_test(timeout=180)
async def test_redis_outage_loses_nothing_and_never_blocks_consumes(cluster):
    redis_server = Redis()  # this test's own: it is killed and started again
    redis_server.start()
    try:
        await _redis_outage(cluster, redis_server)
    finally:
        redis_server.kill()


async def _redis_outage(cluster, redis_server) -> None:
    a, b = await cluster(2, backplane={"url": redis_server.url})
    ws_b = await ws_connect(b, "types=violation")
    await ws_b.recv_type("welcome")
    await violate(a, "dave")
    first = await ws_b.recv_type("violation")
    redis_server.kill()

    async def disconnected():
        health = (await call(a, "GET", "/api/ws/health", token=VIEWER)).json
        return health["status"] == "degraded" and not health["backplane"]["connected"]

    await wait_for(disconnected, "A to report the backplane down")
    # Consumes (admitted and refused) go on committing while Redis is gone.
    during = await asyncio.gather(*(violate(a, "dave", i) for i in range(1, 11)))
    assert (await consume(a, "erin", "shell")).code == 200
    redis_server.start()

    async def reconnected():
        health = (await call(b, "GET", "/api/ws/health", token=VIEWER)).json
        return health["backplane"]["connected"]

    await wait_for(reconnected, "B to reconnect to Redis")
    got = await violations(ws_b, 10)
    seqs = [first["seq"]] + [m["seq"] for m in got]
    assert seqs == sorted(seqs) and len(set(seqs)) == 11
    assert sorted(ident(m) for m in got) == sorted(during)
    # Nothing more arrives twice later on.
    await violate(b, "dave")
    assert (await ws_b.recv_type("violation"))["seq"] > seqs[-1]


@pytest.mark.gen_test(timeout=180)
async def test_the_last_events_of_an_outage_reach_the_other_instance_with_nothing_after(cluster):
    """Tail loss: A commits violations while Redis is down and dies before it could publish
    them (its queue goes with it); nothing is published after. B still delivers every one
    (from the event log: its ticks while the backplane is down, its resync on reconnect)."""
    redis_server = Redis()  # this test's own: it is killed and started again
    redis_server.start()
    try:
        a, b = await cluster(2, backplane={"url": redis_server.url})
        ws_b = await ws_connect(b, "types=violation")
        await ws_b.recv_type("welcome")
        await violate(a, "tess")
        first = await ws_b.recv_type("violation")
        redis_server.kill()

        async def disconnected():
            health = (await call(a, "GET", "/api/ws/health", token=VIEWER)).json
            return not health["backplane"]["connected"]

        await wait_for(disconnected, "A to report the backplane down")
        during = [await violate(a, "tess", i) for i in range(1, 6)]
        a.kill()  # SIGKILL: whatever A still meant to publish is gone
        redis_server.start()
        got = await violations(ws_b, 5)
        assert sorted(ident(m) for m in got) == sorted(during)
        seqs = [first["seq"]] + [m["seq"] for m in got]
        assert seqs == sorted(set(seqs))
    finally:
        redis_server.kill()


@pytest.mark.gen_test(timeout=120)
async def test_an_id_committed_after_a_higher_one_is_impossible_and_nothing_is_skipped(cluster):
    """A writer holds its event transaction open (between the id and COMMIT) while another
    instance records a violation: event ids commit in order, so the second one waits for
    the first, and clients get both, in order, although nobody published the first."""
    import peewee

    from quotaserver import models
    from quotaserver.db import open_database
    from quotaserver.events import append_event
    from quotaserver.windows import utc_now

    a, b = await cluster(2)
    ws = await ws_connect(b, "types=violation,quota_change")
    await ws.recv_type("welcome")
    db = open_database(cluster.db_url)
    models.database_proxy.initialize(db)  # this test process acts as a writer too
    holding, release = threading.Event(), threading.Event()
    held: dict = {}

    def writer() -> None:
        with db.atomic():
            held["message"] = append_event("quota_change", {"held": True}, utc_now())
            holding.set()
            release.wait(30)
        db.close()

    thread = threading.Thread(target=writer)
    thread.start()
    await asyncio.get_running_loop().run_in_executor(None, holding.wait, 10)
    pending = asyncio.ensure_future(violate(b, "frank"))
    waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"

    async def blocked():  # B's violation has its id's turn to commit: it waits for ours
        return await asyncio.get_running_loop().run_in_executor(
            None, scalar, cluster.db_url, waiting
        )

    await wait_for(blocked, "B's event transaction to wait for the open one")
    assert not pending.done()
    release.set()
    await pending
    await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)
    first = await ws.recv_type("quota_change")
    second = await ws.recv_type("violation")
    assert first["seq"] == held["message"].seq and first["data"] == {"held": True}
    assert second["seq"] > first["seq"] and ident(second) == await pending
    assert isinstance(db, peewee.PostgresqlDatabase)


@pytest.mark.gen_test(timeout=120)
async def test_stats_and_alerts_agree_across_instances(cluster):
    a, b = await cluster(2)
    for i in range(6):  # quota_violation's threshold is 5 per user and day
        await violate(a if i % 2 else b, "grace")
    await consume(a, "heidi", "shell", 10)
    await consume(b, "ivan", "shell", 170)  # 85% of the daily limit: high utilisation
    expected = {
        "total_users": 3,
        "active_users_today": 2,
        "commands_today": 180,
        "violations_today": 6,
        "high_utilization_count": 1,
    }

    async def agreed():
        stats = []
        for server in (a, b):
            ws = await ws_connect(server, "types=stats")
            snapshot = (await ws.recv_type("stats"))["data"]
            ws.close()
            stats.append({k: snapshot[k] for k in expected})
        return stats if stats == [expected, expected] else None

    await wait_for(agreed, "both instances to show the same stats")
    for server in (a, b):  # violations 5 and 6 raised it (on either instance): one alert

        async def alerts(server=server):
            listed = (await call(server, "GET", "/api/admin/quotas/alerts", token=ADMIN)).json
            found = [x for x in listed["items"] if x["alert_type"] == "quota_violation"]
            return found if found and found[0]["count"] >= 2 else None

        (alert,) = await wait_for(alerts, "the quota_violation alert")
        assert alert["username"] == "grace"


@pytest.mark.gen_test(timeout=180)
async def test_two_workers_share_one_port_and_every_event(cluster):
    (server,) = await cluster(1, "--workers", "2")
    clients, instances = [], set()
    for _ in range(40):  # the kernel spreads connections over both workers
        ws = await ws_connect(server, "types=violation")
        instances.add((await ws.recv_type("welcome"))["data"]["instance"])
        clients.append(ws)
        if len(instances) == 2 and len(clients) >= 4:
            break
    assert len(instances) == 2, instances
    ids = [await violate(server, f"user{i}") for i in range(6)]
    for ws in clients:
        got = await violations(ws, 6)
        assert sorted(ident(m) for m in got) == sorted(ids)
    with open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children") as fh:
        workers = [int(pid) for pid in fh.read().split()]
    assert len(workers) == 2
    assert await server.stop(signal.SIGTERM) == 0
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.gen_test(timeout=180)
async def test_postgresql_stopped_gives_503_then_the_server_recovers(cluster, pg):
    (a,) = await cluster(1)
    assert (await consume(a, "judy", "shell")).code == 200
    pg.stop("fast")
    try:
        started = asyncio.get_running_loop().time()
        down = await asyncio.gather(*(consume(a, "judy", "shell") for _ in range(5)))
        answered = asyncio.get_running_loop().time() - started
        print(f"\n[reliability] PostgreSQL stopped: 5 consumes answered 503 in "
              f"{answered * 1000:.0f} ms")  # fmt: skip
        assert {r.code for r in down} == {503}, down
        assert {r.json["error"]["code"] for r in down} == {"database_unavailable"}
        assert all(r.headers.get("Retry-After") for r in down)
        health = await call(a, "GET", "/api/health")
        assert health.code == 503 and health.json["database"]["reachable"] is False
    finally:
        pg.start()
    recovered = await consume(a, "judy", "shell")
    assert recovered.code == 200 and recovered.json["periods"]["daily"]["used"] == 2
    assert (await call(a, "GET", "/api/health")).code == 200


@pytest.mark.gen_test(timeout=180)
async def test_two_workers_on_one_sqlite_file_stay_exact(cluster, tmp_path):
    (server,) = await cluster(
        1, "--workers", "2", database=f"sqlite:///{tmp_path}/shared.db", quotas={
            "defaults": {"shell": {"daily": 60, "weekly": 100_000, "monthly": 100_000}}
        },
    )  # fmt: skip
    watcher = await ws_connect(server, "types=violation")
    await watcher.recv_type("welcome")
    results = await asyncio.gather(*(consume(server, "kim", "shell") for _ in range(100)))
    codes = [r.code for r in results]
    assert codes.count(200) == 60 and codes.count(429) == 40, codes
    seqs = [m["seq"] for m in await violations(watcher, 40)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 40
    assert await server.stop(signal.SIGTERM) == 0


@pytest.mark.gen_test(timeout=120)
async def test_a_password_protected_redis_and_a_wrong_password(cluster, tmp_path):
    locked = Redis(password="s3cret-backplane")
    locked.start()
    try:
        good = locked.url
        bad = good.replace("s3cret-backplane", "wrong")
        (a,) = await cluster(1, backplane={"url": good})
        (b,) = await cluster(1, backplane={"url": bad})
        health = (await call(a, "GET", "/api/ws/health", token=VIEWER)).json
        assert health["backplane"]["connected"] and health["status"] == "ok"

        async def refused():
            health = (await call(b, "GET", "/api/ws/health", token=VIEWER)).json
            backplane = health["backplane"]
            return health["status"] == "degraded" and backplane["last_error"] and health

        health = await wait_for(refused, "B to report the refused password")
        assert not health["backplane"]["connected"]
        assert "wrong" not in health["backplane"]["last_error"]  # no secret in health
        # Consumes never depend on the backplane.
        assert (await consume(b, "leo", "shell")).code == 200
    finally:
        locked.kill()


@pytest.mark.gen_test(timeout=120)
async def test_demo_traffic_and_dev_endpoints_under_workers(cluster):
    (server,) = await cluster(1, "--workers", "2", "--demo")
    for i in range(4):  # connections land on either worker: each serves the dev endpoints
        sent = await call(
            server, "POST", "/api/ws/test-violation", {"user": f"dev{i}", "command_type": "shell"}
        )
        assert sent.code == 200, sent

    async def demo_counted():  # the demo's requests are accepted by whichever worker
        stats = (await call(server, "GET", "/api/admin/quotas/stats", token=ADMIN)).json
        return stats["stats"]["commands_today"] >= 10

    await wait_for(demo_counted, "demo traffic to be counted")
    assert await server.stop(signal.SIGTERM) == 0
    assert not [line for line in server.output if " 401 " in line or "Traceback" in line]


# -- who may enter is decided once, for the whole cluster ----------------------------------
NOT_NUDGED = {"sync_interval": 30.0}  # only the backplane nudge can make a change this quick
ADMIN_ID = hashlib.sha256(ADMIN.encode()).hexdigest()[:16]


async def status(server, token: str | None = None, headers: dict | None = None) -> int:
    """The status of an authenticated read on a fresh connection."""
    return (await call(server, "GET", "/api/ws/health", token=token, headers=headers)).code


async def holds(servers, token: str | None, code: int, what: str, bound: float, headers=None):
    """Wait until every server answers ``code`` for these credentials (at most ``bound``)."""

    async def everywhere():
        codes = [await status(s, token, headers) for s in servers]
        return all(c == code for c in codes)

    await wait_for(everywhere, what, timeout=bound)


async def create_token(server, name: str, role: str = "viewer", token: str = ADMIN) -> dict:
    created = await call(server, "POST", "/api/admin/tokens", {"name": name, "role": role}, token)
    assert created.code == 201, created
    return created.json


async def _tokens_and_sessions_hold_everywhere(a, b, bound: float) -> None:
    """Created on A: works on B; revoked on A: B refuses it and ends B's streams (1008);
    logged out on A: B refuses the session and ends its stream."""
    created = await create_token(a, "ci-bot")
    await holds([b], created["token"], 200, "B to accept a token created on A", bound)
    ws = await ws_connect(b, "types=violation", token=created["token"])
    await ws.recv_type("welcome")
    sse = await sse_connect(b, "types=violation", token=created["token"])
    await sse.next_type("welcome")
    revoked = await call(a, "DELETE", f"/api/admin/tokens/{created['token_id']}")
    assert revoked.code == 200, revoked
    assert await ws.closed(timeout=bound) == 1008
    closing = await sse.next_type("close", timeout=bound)
    assert closing["message"]["data"]["code"] == 1008
    assert await status(b, created["token"]) == 401

    browser = await session_headers(b, VIEWER)
    watcher = await ws_connect(b, "types=violation", token=None, headers=browser)
    await watcher.recv_type("welcome")
    out = await call(
        a, "POST", "/logout", token=None, headers=browser | {"Accept": "application/json"}
    )
    assert out.code == 200 and out.json == {"logged_out": True}, out
    assert await watcher.closed(timeout=bound) == 1008
    assert await status(b, headers=browser) == 401


@pytest.mark.gen_test(timeout=120)
async def test_tokens_revocations_and_logouts_hold_on_every_instance_through_the_backplane(cluster):
    a, b = await cluster(2, auth=NOT_NUDGED)
    await _tokens_and_sessions_hold_everywhere(a, b, bound=5.0)
    health = (await call(b, "GET", "/api/ws/health", token=VIEWER)).json
    assert health["backplane"]["rejected"] == 0


@pytest.mark.gen_test(timeout=120)
async def test_tokens_revocations_and_logouts_hold_through_the_database_alone(cluster):
    a, b = await cluster(2, backplane={"url": ""})  # no Redis: auth.sync_interval (1 s) polls
    await _tokens_and_sessions_hold_everywhere(a, b, bound=5.0)


@pytest.mark.gen_test(timeout=180)
async def test_tokens_hold_on_every_worker(cluster):
    (server,) = await cluster(1, "--workers", "2", auth=NOT_NUDGED)
    created = await create_token(server, "worker-bot")
    # Each call is a new connection, spread over both workers by SO_REUSEPORT.
    await holds([server] * 12, created["token"], 200, "both workers to accept it", 5.0)
    revoked = await call(server, "DELETE", f"/api/admin/tokens/{created['token_id']}")
    assert revoked.code == 200, revoked
    await holds([server] * 12, created["token"], 401, "both workers to refuse it", 5.0)


@pytest.mark.gen_test(timeout=120)
async def test_a_revoked_admin_can_change_nothing_on_a_process_that_has_not_reloaded(cluster):
    # No backplane and a long poll: B, started after the tokens exist, keeps believing in
    # the revoked token for 30 s, yet the database refuses what it tries.
    (a,) = await cluster(1, backplane={"url": ""}, auth=NOT_NUDGED)
    rogue = await create_token(a, "rogue", "admin")
    other = await create_token(a, "other", "admin")
    (b,) = await cluster(1, backplane={"url": ""}, auth=NOT_NUDGED)
    assert (await call(a, "DELETE", f"/api/admin/tokens/{rogue['token_id']}")).code == 200
    assert await status(b, rogue["token"]) == 200  # B has not reloaded yet (stale for 30 s)
    made = await call(
        b, "POST", "/api/admin/tokens", {"name": "x", "role": "admin"}, rogue["token"]
    )
    assert made.code == 401 and made.json["error"]["code"] == "unauthorized", made
    gone = await call(b, "DELETE", f"/api/admin/tokens/{other['token_id']}", token=rogue["token"])
    assert gone.code == 401, gone
    listed = (await call(a, "GET", "/api/admin/tokens")).json["tokens"]
    assert {t["name"] for t in listed if not t["revoked"]} >= {"test-admin", "other"}
    assert "x" not in {t["name"] for t in listed}


@pytest.mark.gen_test(timeout=120)
async def test_the_last_admin_cannot_be_revoked_from_two_processes_at_once(cluster):
    (a,) = await cluster(1, backplane={"url": ""}, auth=NOT_NUDGED)
    second = await create_token(a, "second-admin", "admin")
    (b,) = await cluster(1, backplane={"url": ""}, auth=NOT_NUDGED)  # loads both admins
    # A revokes the config admin with the second; B revokes the second with the config admin.
    results = await asyncio.gather(
        call(a, "DELETE", f"/api/admin/tokens/{ADMIN_ID}", token=second["token"]),
        call(b, "DELETE", f"/api/admin/tokens/{second['token_id']}", token=ADMIN),
    )
    codes = sorted(r.code for r in results)
    assert codes[0] == 200 and codes[1] in (401, 409), results
    # The database, the cluster's truth, revoked exactly one of the two.
    assert (
        scalar(cluster.db_url, "SELECT count(*) FROM api_token WHERE revoked_at IS NOT NULL") == 1
    )


async def _login_code(server) -> str:
    """The code of the sign-in link the server prints after "listening on"."""

    async def printed():
        return re.findall(r"/login#code=([\w-]+)", "".join(server.output))

    (code,) = await wait_for(printed, "the sign-in link")
    return code


@pytest.mark.gen_test(timeout=120)
async def test_a_sign_in_code_works_once_on_any_instance(cluster):
    a, b = await cluster(2, auth={"tokens": []})  # no admin configured: the first-run token
    code = await _login_code(a)
    resp, _ = await login(b, "code", code)
    assert resp.code == 302 and "qs_session" in cookies_of(resp)
    for server in (a, b):
        again, _ = await login(server, "code", code)
        assert again.code == 401, again


@pytest.mark.gen_test(timeout=180)
async def test_a_sign_in_code_works_once_across_workers(cluster):
    (server,) = await cluster(1, "--workers", "2", auth={"tokens": []})
    code = await _login_code(server)
    resp, _ = await login(server, "code", code)
    assert resp.code == 302, resp
    # Ten new connections, spread over both workers: none gets in with the spent code.
    for _ in range(10):
        again, _ = await login(server, "code", code)
        assert again.code == 401, again


@pytest.mark.gen_test(timeout=120)
async def test_backplane_messages_without_the_secret_reach_no_dashboard(cluster, redis_server):
    import redis.asyncio as redis

    a, b = await cluster(2)
    channel = cluster.config["backplane"]["channel"]
    spy = redis.Redis.from_url(redis_server.url)
    pubsub = spy.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(channel)
    watchers = []
    for server in (a, b):
        ws = await ws_connect(server, "types=violation,alert")
        await ws.recv_type("welcome")
        watchers.append(ws)
    try:
        await violate(a, "mallory")
        raw = None
        while raw is None:
            item = await pubsub.get_message(timeout=5.0)
            if item and item["type"] == "message":
                raw = item["data"]
        envelope = json.loads(raw.split(b".", 1)[1])
        assert envelope["type"] == "violation"  # a real message, as published
        forged = {**envelope, "seq": envelope["seq"] + 1}
        forged["data"] = {**envelope["data"], "username": "eve"}
        as_alert = {**forged, "type": "alert", "data": {"message": "forged alert"}}
        wrong_key = hmac.new(b"not-the-secret" * 3, json.dumps(forged).encode(), "sha256")
        for fake in (
            json.dumps(forged),  # unsigned
            json.dumps(as_alert),
            f"{wrong_key.hexdigest()}.{json.dumps(forged)}",  # signed with another key
        ):
            await spy.publish(channel, fake)

        async def rejected():
            health = (await call(b, "GET", "/api/ws/health", token=VIEWER)).json
            return health["backplane"]["rejected"] >= 3

        await wait_for(rejected, "B to reject the three forged messages")
        await violate(a, "trudy")
        seen = []
        for ws in watchers:
            got = []
            while not got or got[-1]["data"].get("username") != "trudy":
                got.append(await ws.recv_type("violation", timeout=15))
            seen.append([(m["seq"], m["data"]["username"]) for m in got])
            everything = json.dumps(ws.messages)
            assert "eve" not in everything and "forged alert" not in everything
        assert seen[0] == seen[1], seen  # the same real events, same seqs, on A and B
    finally:
        await pubsub.aclose()
        await spy.aclose()


@pytest.mark.gen_test(timeout=180)
async def test_three_instances_started_together_on_an_empty_database_all_come_up(cluster, tmp_path):
    servers = await cluster(3, at_once=True)
    for server in servers:
        assert (await call(server, "GET", "/api/health")).code == 200
    assert scalar(cluster.db_url, "SELECT max(version) FROM schema_version") == SCHEMA_VERSION
    assert scalar(cluster.db_url, "SELECT count(*) FROM quota_rule WHERE scope = ''") == 3
    # A database migrated by a newer version is refused, naming both versions.
    import psycopg2

    with psycopg2.connect(cluster.db_url) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO schema_version VALUES (999, now())")
    path = write_config(str(tmp_path / "newer.yaml"), cluster.config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTASERVER_")}
    refused = subprocess.run(
        [sys.executable, os.path.join(ROOT, "run.py"), "--config", path, "--port", "0"],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert "schema is version 999" in refused.stderr
    assert f"schema version {SCHEMA_VERSION}" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.gen_test(timeout=120)
async def test_failed_authentications_are_limited_for_the_cluster_not_per_instance(cluster):
    a, b = await cluster(2, auth={"failed_attempts_per_ip": 40})
    answers = []
    for i in range(100):  # alternating, as a guesser spreading over instances would
        answers.append(await status((a, b)[i % 2], f"guess-{i}-0123456789abcdef"))
    refused_as_wrong = answers.count(401)
    # 40, plus at most one per other instance while its cluster count is in flight; one
    # process counting alone would let 2 x 40 through.
    assert 40 <= refused_as_wrong <= 41, answers
    assert answers[-10:] == [429] * 10
    assert await status(a, ADMIN) == 429 and await status(b, ADMIN) == 429  # the address


@pytest.mark.gen_test(timeout=120)
async def test_the_connection_cap_per_identity_counts_every_instance(cluster):
    a, b = await cluster(2, auth={"max_connections_per_identity": 3})
    held = []
    for _ in range(3):
        ws = await ws_connect(a, "types=violation", token=VIEWER)
        await ws.recv_type("welcome")
        held.append(ws)

    async def refused_on_b():  # B hears A's counts within a second
        try:
            ws = await ws_connect(b, "types=violation", token=VIEWER)
        except Exception as exc:  # the 429 before the upgrade
            return getattr(exc, "code", None) == 429
        ws.close()
        return False

    await wait_for(refused_on_b, "B to count A's connections of the same identity")
    for ws in held:
        ws.close()
    await wait_for(lambda: _admitted(b), "B to admit the identity again once A's are closed")


async def _admitted(server) -> bool:
    try:
        ws = await ws_connect(server, "types=violation", token=VIEWER)
    except Exception:  # noqa: BLE001 - still refused
        return False
    await ws.recv_type("welcome")
    ws.close()
    return True
