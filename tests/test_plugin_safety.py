"""Plugin code that blocks the event loop cannot keep the server from stopping."""

import asyncio
import os
import signal
import textwrap
import time

import pytest
from clients import ADMIN, call, consume, ws_connect
from services import start_server
from waits import wait_until, wait_until_async

# An async on_violation that blocks and never returns: it holds the event loop for good.
FROZEN = """
import os
import threading
from quotaserver import hookimpl

@hookimpl
async def on_violation(app, violation):
    open(os.environ["FROZEN_MARKER"], "w").close()
    threading.Event().wait()
"""


# An async on_violation that holds the loop for 0.8 s on every call (time.sleep).
SLOW = """
import os
import time
from quotaserver import hookimpl

@hookimpl
async def on_violation(app, violation):
    with open(os.environ["SLOW_CALLS"], "a") as fh:
        fh.write("call\\n")
    time.sleep(0.8)
"""


# A plain on_violation that never returns: it runs in its plugin's pool, not on the loop.
NEVER = """
import os
import threading
from quotaserver import hookimpl

@hookimpl
def on_violation(app, violation):
    with open(os.environ["NEVER_CALLS"], "a") as fh:
        fh.write("call\\n")
    threading.Event().wait()
"""


# Called first (registered last): it vandalises the violation it is given.
VANDAL = """
from quotaserver import hookimpl

@hookimpl
def on_violation(app, violation):
    violation["username"] = "someone-else"
    violation.clear()
"""

WATCHER = """
import json
import os
from quotaserver import hookimpl

@hookimpl
async def on_violation(app, violation):
    with open(os.environ["WATCHER_SEEN"], "a") as fh:
        fh.write(json.dumps(violation.get("username")) + "\\n")
"""


def third_party_plugins(tmp_path, **files) -> str:
    directory = tmp_path / "plugins"
    directory.mkdir(exist_ok=True)
    for name, text in files.items():
        (directory / f"{name}.py").write_text(textwrap.dedent(text))
    return str(directory)


async def loop_blocks(server) -> dict:
    return (await call(server, "GET", "/api/ws/health", token=ADMIN)).json["loop_blocks"]


async def _blocks_are(server, n: int) -> bool:
    return (await loop_blocks(server)).get("slow", 0) == n


def settings(tmp_path, plugins_dir: str, shutdown_timeout: float, **more) -> dict:
    return {
        **more,
        "plugins_dir": plugins_dir,
        "server": {"shutdown_timeout": shutdown_timeout},
        "quotas": {"defaults": {"shell": {"daily": 1}}},
        "plugins": {"system_metrics": {"enabled": False}},
    }


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.gen_test(timeout=60)
async def test_a_signal_ends_a_server_whose_loop_a_plugin_blocks(tmp_path, sig):
    marker = tmp_path / "frozen"
    budget = 2.0
    server = await start_server(
        str(tmp_path),
        settings(tmp_path, third_party_plugins(tmp_path, frozen=FROZEN), budget),
        env={"QUOTASERVER_ADMIN_TOKEN": ADMIN, "FROZEN_MARKER": str(marker)},
    )
    try:
        assert (await consume(server, "nia", token=ADMIN)).code == 200
        # The second consume is refused, and the violation freezes the loop.
        stalled = asyncio.ensure_future(consume(server, "nia", token=ADMIN))
        await wait_until(lambda: os.path.exists(marker), "the plugin to block the loop")
        await asyncio.sleep(0.3)
        started = time.monotonic()
        server.send_signal(sig)
        status = await server.wait(timeout=budget + 2 + 5)
        took = time.monotonic() - started
        stalled.cancel()
    finally:
        server.kill()
    output = "".join(server.output)
    assert took < budget + 2, f"took {took:.1f} s\n{output}"
    assert status == 1, output
    assert "plugin frozen was running on_violation" in output, output
    assert "Traceback" not in output, output


@pytest.mark.gen_test(timeout=90)
async def test_the_watchdog_names_counts_and_disables_a_plugin_that_blocks_the_loop(tmp_path):
    calls = tmp_path / "slow-calls"
    server = await start_server(
        str(tmp_path),
        settings(tmp_path, third_party_plugins(tmp_path, slow=SLOW), 3.0),
        env={"QUOTASERVER_ADMIN_TOKEN": ADMIN, "SLOW_CALLS": str(calls)},
    )
    try:
        assert (await consume(server, "nia", token=ADMIN)).code == 200
        for expected in (1, 2, 3):
            assert (await consume(server, "nia", token=ADMIN)).code == 429
            await wait_until(
                lambda n=expected: calls.exists() and len(calls.read_text().split()) == n,
                "the slow plugin's call",
            )
            await wait_until_async(
                lambda n=expected: _blocks_are(server, n), "the watchdog to count the block"
            )
        health = (await call(server, "GET", "/api/ws/health", token=ADMIN)).json
        assert health["loop_blocks"] == {"slow": 3}
        assert "blocked the event loop 3 times" in health["plugins_disabled"]["slow"]
        assert health["status"] == "degraded"
        assert any(f["plugin"] == "slow" for f in health["plugin_failures"])
        metrics = (await call(server, "GET", "/metrics", token=ADMIN)).body.decode()
        assert 'quotaserver_loop_blocks_total{plugin="slow"} 3.0' in metrics
        # Disabled: its hook is no longer called.
        assert (await consume(server, "nia", token=ADMIN)).code == 429
        await asyncio.sleep(1.0)
        assert len(calls.read_text().split()) == 3
        output = "".join(server.output)
        assert "plugin slow blocks the event loop in on_violation" in output, output
        assert "plugin slow disabled: blocked the event loop 3 times" in output, output
        assert await server.stop() == 0
    finally:
        server.kill()


@pytest.mark.gen_test(timeout=90)
async def test_a_plain_hook_that_never_returns_costs_its_pool_not_the_loop(tmp_path):
    calls = tmp_path / "never-calls"
    budget = 3.0
    server = await start_server(
        str(tmp_path),
        settings(
            tmp_path,
            third_party_plugins(tmp_path, never=NEVER),
            budget,
            plugin_timeout=0.5,
            realtime={"heartbeat_interval": 0.2},
        ),
        env={"QUOTASERVER_ADMIN_TOKEN": ADMIN, "NEVER_CALLS": str(calls)},
    )
    try:
        ws = await ws_connect(server)
        assert (await consume(server, "nia", token=ADMIN)).code == 200
        # Six violations: more than the plugin's 4 threads, every one of them hung.
        for _ in range(6):
            started = time.monotonic()
            assert (await consume(server, "nia", token=ADMIN)).code == 429
            assert time.monotonic() - started < 1.0
        await wait_until(
            lambda: calls.exists() and len(calls.read_text().split()) == 4, "the hung calls"
        )
        for user in ("ana", "bo", "cy"):
            started = time.monotonic()
            assert (await consume(server, user, token=ADMIN)).code == 200
            assert time.monotonic() - started < 1.0
        # Heartbeats keep flowing, one every interval.
        pings = []
        for _ in range(3):
            await ws.recv_type("ping", timeout=2.0)
            pings.append(time.monotonic())
        assert pings[-1] - pings[0] < 2 * 0.2 + 1.0
        await wait_until_async(lambda: _never_timed_out(server), "the culprit in health")
        health = (await call(server, "GET", "/api/ws/health", token=ADMIN)).json
        culprits = {f["plugin"] for f in health["plugin_failures"] if f["failing"]}
        assert culprits == {"never"}, health["plugin_failures"]
        assert health["loop_blocks"] == {}
        started = time.monotonic()
        status = await server.stop(timeout=budget + 2 + 5)
        assert time.monotonic() - started < budget + 2
        assert status == 0, "".join(server.output)
    finally:
        server.kill()
    assert "Traceback" not in "".join(server.output)


async def _never_timed_out(server) -> bool:
    health = (await call(server, "GET", "/api/ws/health", token=ADMIN)).json
    return any(
        f["plugin"] == "never" and f["hook"] == "on_violation" and f["timeouts"] >= 4
        for f in health["plugin_failures"]
    )


@pytest.mark.gen_test(timeout=90)
async def test_a_plugin_that_mutates_a_violation_changes_nothing_for_the_next(tmp_path):
    seen = tmp_path / "seen"
    server = await start_server(
        str(tmp_path),
        settings(tmp_path, third_party_plugins(tmp_path, a_watcher=WATCHER, zz_vandal=VANDAL), 3.0),
        env={"QUOTASERVER_ADMIN_TOKEN": ADMIN, "WATCHER_SEEN": str(seen)},
    )
    try:
        for user in ("nia", "bo"):
            assert (await consume(server, user, token=ADMIN)).code == 200
            assert (await consume(server, user, token=ADMIN)).code == 429
        await wait_until(
            lambda: seen.exists() and len(seen.read_text().split()) == 2, "the watcher's calls"
        )
        assert seen.read_text().split() == ['"nia"', '"bo"']
        listed = (await call(server, "GET", "/api/admin/quotas/violations", token=ADMIN)).json
        assert "someone-else" not in str(listed)
        assert await server.stop() == 0
    finally:
        server.kill()
