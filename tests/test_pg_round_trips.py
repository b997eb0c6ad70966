"""Issue 23: an admitted consume on PostgreSQL is at most 3 round trips, counted by the
server itself (``log_statement = all``: one log line per query message the server got).

The PostgreSQL cluster is this module's own, so its logging can be changed.
"""

from __future__ import annotations

import os
import re
import uuid

import pytest
from clients import consume
from services import INITDB, Postgres

pytestmark = pytest.mark.skipif(
    INITDB is None, reason="PostgreSQL server binaries not installed (apt-get install postgresql)"
)

_LINE = re.compile(r"^\[(\d+)\] .*?LOG:  statement: (.*)$")


@pytest.fixture(scope="module")
def logged_pg():
    psycopg2 = pytest.importorskip("psycopg2", reason="pip install psycopg2-binary")
    server = Postgres()
    server.start()
    try:
        url = server.create_database()
        conn = psycopg2.connect(url)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("ALTER SYSTEM SET log_statement = 'all'")
            cur.execute("ALTER SYSTEM SET log_line_prefix = '[%p] '")
            cur.execute("SELECT pg_reload_conf()")
        conn.close()
        yield url, os.path.join(server.workdir, "log")
    finally:
        server.destroy()


def _mark(url: str) -> str:
    """A unique statement in the server's log, sent on a connection of its own."""
    import psycopg2

    tag = f"mark-{uuid.uuid4().hex}"
    conn = psycopg2.connect(url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"SELECT '{tag}'")
    conn.close()
    return tag


def _statements_between(log_path: str, start: str, end: str) -> list[tuple[int, str]]:
    with open(log_path, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    begin, finish = text.index(start), text.index(end)
    lines = []
    for line in text[begin:finish].splitlines()[1:]:
        found = _LINE.match(line)
        if found:
            lines.append((int(found.group(1)), found.group(2)))
    return lines


async def _consume_statements(app, url: str, log_path: str, user: str) -> list[str]:
    start = _mark(url)
    response = await consume(app, user, "code")
    end = _mark(url)
    assert response.code == 200, response.json
    lines = _statements_between(log_path, start, end)
    # The consume's connection is the one that ran the counters' upsert.
    pids = {pid for pid, sql in lines if '"usage"' in sql and "ON CONFLICT" in sql}
    assert len(pids) == 1, lines
    return [sql for pid, sql in lines if pid in pids]


@pytest.mark.gen_test(timeout=60)
async def test_an_admitted_consume_is_at_most_three_round_trips(app_factory, logged_pg):
    url, log_path = logged_pg
    # One DB worker: every statement of the consume is on one connection. No stats
    # broadcasts or probes meanwhile on that connection.
    app = await app_factory(
        database__url=url,
        database__pool_size=1,
        realtime__stats_interval=3600,
        quotas__periods=["hourly", "daily", "weekly", "monthly"],
    )
    await app.rules.set_global_limits("code", {"daily": 100, "hourly": 50}, actor="t")
    first = await consume(app, "rt-user", "code")  # first sight: creates user and counters
    assert first.code == 200

    statements = await _consume_statements(app, url, log_path, "rt-user")
    assert 1 <= len(statements) <= 3, statements
    assert statements[0].startswith("BEGIN; "), statements  # BEGIN rides on the lookup
    assert statements[-1] == "COMMIT", statements

    # And what those statements did is all of it: counters, peak and (flushed) activity.
    status = await consume(app, "rt-user", "code")
    assert status.json["periods"]["daily"]["used"] == 3
    assert status.json["periods"]["hourly"]["used"] == 3

    def peak_and_activity():
        from quotaserver.models import Activity, DailyPeak

        rank = DailyPeak.select(DailyPeak.rank).scalar()
        return rank, sum(a.commands for a in Activity.select())

    await app.quota.flush_activity()
    rank, commands = await app.store.run(peak_and_activity)
    assert rank == -3.0  # the daily peak: 3/100 = 3 % (hourly 3/50 is not counted)
    assert commands == 3


@pytest.mark.gen_test(timeout=60)
async def test_a_batch_is_a_fixed_number_of_round_trips_whatever_its_size(app_factory, logged_pg):
    from clients import SERVICE, call

    url, log_path = logged_pg
    app = await app_factory(database__url=url, database__pool_size=1, realtime__stats_interval=3600)
    users = [f"bt-{i}" for i in range(50)]

    async def batch_statements(size: int) -> list[str]:
        decisions = [
            {"user": users[i % len(users)], "command_type": ("code", "shell")[i % 2]}
            for i in range(size)
        ]
        start = _mark(url)
        answer = await call(
            app, "POST", "/api/quotas/consume/batch", {"decisions": decisions}, token=SERVICE
        )
        end = _mark(url)
        assert answer.code == 200 and all(r["allowed"] for r in answer.json["results"])
        lines = _statements_between(log_path, start, end)
        pids = {pid for pid, sql in lines if '"usage"' in sql and "ON CONFLICT" in sql}
        assert len(pids) == 1, lines
        return [sql for pid, sql in lines if pid in pids]

    await batch_statements(100)  # first sight of every user and counter
    small, large = await batch_statements(10), await batch_statements(400)
    # BEGIN with the users' ids, their rules, the counters read and locked, the counters
    # written, the daily peaks, COMMIT: six, for 10 decisions as for 400.
    assert len(small) == len(large) == 6, (small, large)
    assert small[0].startswith("BEGIN; ") and small[-1] == "COMMIT", small
