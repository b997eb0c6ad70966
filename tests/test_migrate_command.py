"""``quotaserver migrate`` as a release step: it migrates, seeds and applies
``quotas.defaults_policy`` exactly as a starting server does, on a real SQLite file."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import pytest
from clients import call
from conftest import TOKENS
from services import ROOT, start_server, write_config


def settings(tmp_path, daily: int, policy: str) -> dict:
    return {
        "auth": {"tokens": TOKENS},
        "database": {"url": f"sqlite:///{tmp_path}/migrate.db"},
        "throttle": {"source": "off"},
        "quotas": {
            "defaults": {"shell": {"daily": daily, "weekly": 3000}},
            "defaults_policy": policy,
        },
    }


def migrate(tmp_path, daily: int, policy: str) -> subprocess.CompletedProcess:
    path = write_config(
        str(tmp_path / f"migrate-{daily}-{policy}.yaml"), settings(tmp_path, daily, policy)
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTASERVER_")}
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "run.py"), "migrate", "--config", path],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def shell_daily(tmp_path) -> int:
    with sqlite3.connect(tmp_path / "migrate.db") as db:
        rows = db.execute(
            'SELECT "limit" FROM quota_rule '
            "WHERE command_type = 'shell' AND period = 'daily' AND user_id IS NULL"
        ).fetchall()
    assert len(rows) == 1, rows
    return rows[0][0]


@pytest.mark.gen_test(timeout=120)
async def test_migrate_warns_under_seed_and_applies_under_enforce_like_serve(tmp_path):
    first = migrate(tmp_path, 500, "seed")  # an empty database: migrated and seeded
    assert first.returncode == 0, first.stderr
    assert "schema version" in first.stdout

    seeded = migrate(tmp_path, 600, "seed")  # the database wins, with the warning serve gives
    assert seeded.returncode == 0, seeded.stderr
    expected = "quotas.defaults.shell.daily: the configuration says 600, the database has 500"
    assert expected in seeded.stderr
    assert shell_daily(tmp_path) == 500

    enforced = migrate(tmp_path, 600, "enforce")  # the file wins, before any server starts
    assert enforced.returncode == 0, enforced.stderr
    assert shell_daily(tmp_path) == 600

    # A server started afterwards with the same file finds nothing to change, and the
    # audit names the configuration as the actor of the change migrate made.
    server = await start_server(str(tmp_path), settings(tmp_path, 600, "enforce"))
    try:
        audit = await call(server, "GET", "/api/admin/quotas/audit?actor=config")
        assert audit.code == 200, audit
        (row,) = audit.json["items"]
        assert (row["action"], row["target"]) == ("limits.update", "rule:shell:global")
        assert row["details"]["before"] == {"daily": 500}
        assert row["details"]["after"] == {"daily": 600}
    finally:
        assert await server.stop() == 0
    assert not [line for line in server.output if "quotas.defaults." in line]
