"""Plugin code that blocks the event loop cannot keep the server from stopping."""

import asyncio
import os
import signal
import textwrap
import time

import pytest
from clients import ADMIN, call, consume
from services import start_server
from waits import wait_for_check, wait_until

# A plain on_violation that never returns: it holds the event loop's thread for good.
FROZEN = """
import os
import threading
from quotaserver import hookimpl

@hookimpl
def on_violation(app, violation):
    open(os.environ["FROZEN_MARKER"], "w").close()
    threading.Event().wait()
"""


# A plain on_violation that holds the loop for 0.8 s on every call.
SLOW = """
import os
import time
from quotaserver import hookimpl

@hookimpl
def on_violation(app, violation):
    with open(os.environ["SLOW_CALLS"], "a") as fh:
        fh.write("call\\n")
    time.sleep(0.8)
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


def settings(tmp_path, plugins_dir: str, shutdown_timeout: float) -> dict:
    return {
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
            await wait_for_check(
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
