"""Plugin code that blocks the event loop cannot keep the server from stopping."""

import asyncio
import os
import signal
import textwrap
import time

import pytest
from clients import ADMIN, consume
from services import start_server
from waits import wait_until

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


def third_party_plugins(tmp_path, **files) -> str:
    directory = tmp_path / "plugins"
    directory.mkdir(exist_ok=True)
    for name, text in files.items():
        (directory / f"{name}.py").write_text(textwrap.dedent(text))
    return str(directory)


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
