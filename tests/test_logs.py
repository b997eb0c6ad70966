"""Logging of a real process: timestamps, start-up and shutdown lines, text and JSON formats."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys

import pytest
from clients import ADMIN
from services import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAMP = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


async def run_and_stop(tmp_path, log_format: str) -> str:
    """Start run.py, wait until it listens, SIGTERM it; return what it wrote to stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTASERVER_")}
    env.update(
        {
            "QUOTASERVER_ADMIN_TOKEN": ADMIN,
            "QUOTASERVER_THROTTLE_SOURCE": "off",
            "QUOTASERVER_SERVER_LOG_FORMAT": log_format,
        }
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, os.path.join(ROOT, "run.py"), "--port", str(free_port()),
        cwd=str(tmp_path), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    while b"listening on" not in await asyncio.wait_for(proc.stdout.readline(), 30):
        pass
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 15) == 0
    return (await proc.stderr.read()).decode()


@pytest.mark.gen_test(timeout=60)
async def test_text_lines_carry_utc_timestamps_and_mark_start_and_shutdown(tmp_path):
    lines = (await run_and_stop(tmp_path, "text")).splitlines()
    assert lines, "nothing logged"
    for line in lines:
        assert re.match(rf"{STAMP} (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ", line), line
    text = "\n".join(lines)
    assert re.search(r"INFO quotaserver: started quotaserver \S+ on http://127\.0\.0\.1:\d+", text)
    assert "received SIGTERM, shutting down" in text
    assert re.search(r"INFO quotaserver: shutdown complete in \d+\.\d s", text)


@pytest.mark.gen_test(timeout=60)
async def test_json_format_writes_one_object_per_line(tmp_path):
    lines = (await run_and_stop(tmp_path, "json")).splitlines()
    records = [json.loads(line) for line in lines]
    for record in records:
        assert set(record) >= {"time", "level", "logger", "message"}
        assert re.fullmatch(STAMP, record["time"])
    messages = [r["message"] for r in records if r["logger"] == "quotaserver"]
    assert any(m.startswith("started quotaserver") for m in messages)
    assert any(m.startswith("shutdown complete") for m in messages)
