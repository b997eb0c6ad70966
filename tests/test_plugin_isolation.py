"""No plugin, however broken, can silence another plugin or keep the server from stopping."""

import asyncio
import logging
import os
import re
import signal
import sys
import textwrap
import threading
import time
from datetime import datetime

import pytest
from clients import ADMIN, VIEWER, call, consume, ws_connect
from plugin_files import plugin_dir
from services import free_port
from waits import wait_until

from quotaserver import isolation
from quotaserver.isolation import ThreadPool

# Registered last, so pluggy's order calls it first: it used to block everything after it.
HUNG = """
import asyncio
from quotaserver import hookimpl

@hookimpl
async def on_violation(app, violation):
    state = app.plugin_state("zz_hung")
    state["entered"] = state.get("entered", 0) + 1
    await asyncio.Event().wait()
    state["left"] = True
"""

WITNESS = """
import asyncio
from quotaserver import hookimpl

@hookimpl
async def on_violation(app, violation):
    await asyncio.sleep(0)
    app.plugin_state("witness").setdefault("seen", []).append(violation["username"])
"""


async def wait_for(predicate) -> None:
    await wait_until(predicate, "the plugin's reaction")


async def violate(app, user):
    await app.rules.set_global_limits("shell", {"daily": 1}, actor="test")
    assert (await consume(app, user)).code == 200
    assert (await consume(app, user)).code == 429


@pytest.mark.gen_test(timeout=60)
async def test_a_hung_hook_delays_no_other_plugin_and_the_alert_fires(app_factory, tmp_path):
    app = await app_factory(
        plugins_dir=plugin_dir(tmp_path, zz_hung=HUNG, witness=WITNESS),
        plugins={"alert_engine": {"rules": {"quota_violation": {"threshold": 1}}}},
        plugin_timeout=60,  # the others must not be waiting for the timeout
    )
    ws = await ws_connect(app, "types=alert")
    await violate(app, "hana")
    alert = await ws.recv_type("alert", timeout=10)
    while alert["data"]["alert_type"] != "quota_violation":  # utilisation alerts come first
        alert = await ws.recv_type("alert", timeout=10)
    await wait_for(lambda: app.plugin_state("witness").get("seen") == ["hana"])
    state = app.plugin_state("zz_hung")
    assert state["entered"] == 1 and "left" not in state  # still hanging meanwhile
    ws.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_timeout_is_logged_counted_and_shown_in_health(app_factory, tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="quotaserver.plugins")
    app = await app_factory(
        plugins_dir=plugin_dir(tmp_path, zz_hung=HUNG, witness=WITNESS), plugin_timeout=0.2
    )
    healthy = (await call(app, "GET", "/api/ws/health", token=VIEWER)).json
    assert healthy["status"] == "ok" and healthy["plugin_failures"] == []
    await violate(app, "ivan")
    await violate(app, "jade")

    async def failures():
        health = (await call(app, "GET", "/api/ws/health", token=VIEWER)).json
        return health, [f for f in health["plugin_failures"] if f["plugin"] == "zz_hung"]

    health, hung = await failures()
    for _ in range(250):
        if hung and hung[0]["timeouts"] == 2:
            break
        await asyncio.sleep(0.02)
        health, hung = await failures()
    assert hung and hung[0]["timeouts"] == 2, health
    assert hung[0]["hook"] == "on_violation" and hung[0]["error"] == "timed out"
    assert datetime.fromisoformat(hung[0]["at"].replace("Z", "+00:00")).tzinfo is not None
    assert health["status"] == "degraded"
    assert health["plugin_errors"]["zz_hung"] == "on_violation: timed out"
    assert app.plugin_state("witness")["seen"] == ["ivan", "jade"]
    listed = (await call(app, "GET", "/api/plugins", token=VIEWER)).json["plugins"]
    by_name = {p["name"]: p for p in listed}
    assert by_name["zz_hung"]["failures"][0]["error"] == "timed out"
    assert by_name["witness"]["failures"] == []
    logged = [r.getMessage() for r in caplog.records if "zz_hung" in r.getMessage()]
    assert len(logged) == 2 and all("on_violation timed out" in m for m in logged)


HOG = """
import asyncio
import threading
from quotaserver import hookimpl

release = threading.Event()

@hookimpl
async def on_decision(app, decision):
    app.plugin_state("hog")["release"] = release
    await asyncio.gather(*(asyncio.to_thread(release.wait) for _ in range(40)))
"""

THREADED = """
import asyncio
from quotaserver import hookimpl

@hookimpl
async def on_decision(app, decision):
    name = await asyncio.to_thread(decision.user.upper)
    app.plugin_state("threaded").setdefault("seen", []).append(name)
"""


@pytest.mark.gen_test(timeout=60)
async def test_stuck_threads_of_one_plugin_starve_no_other(app_factory, tmp_path):
    app = await app_factory(
        plugins_dir=plugin_dir(tmp_path, hog=HOG, threaded=THREADED), plugin_timeout=30
    )
    try:
        for user in ("kim", "lou", "max"):
            assert (await consume(app, user)).code == 200
        await wait_for(lambda: app.plugin_state("threaded").get("seen") == ["KIM", "LOU", "MAX"])
        # The hog has exactly its own bounded pool busy; nobody else's threads are taken.
        await wait_for(lambda: app.threads.busy().get("hog") == app.threads.workers_per_plugin)
        assert app.threads.busy().get("threaded", 0) == 0
    finally:
        release = app.plugin_state("hog").get("release")
        if release is not None:
            release.set()


STUCK = """
import asyncio
import threading
from quotaserver import PeriodicEmitter, hookimpl

forever = threading.Event()

@hookimpl
async def startup(app):
    threading.Thread(target=forever.wait, name="plugin-own-thread").start()  # not a daemon
    loop = asyncio.get_running_loop()
    for _ in range(6):
        loop.run_in_executor(None, forever.wait)

@hookimpl
def register_emitters(app):
    return [PeriodicEmitter("stuck_source", 0.05, forever.wait, blocking=True, timeout=0.1)]

@hookimpl
async def shutdown(app):
    await asyncio.Event().wait()
"""

DEAF = """
import asyncio
from quotaserver import hookimpl

@hookimpl
async def shutdown(app):
    while True:  # ignores cancellation: only the exit guard can end this process
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass
"""


async def start_server(tmp_path, config_text):
    config = tmp_path / "quotaserver.yaml"
    config.write_text(textwrap.dedent(config_text))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTASERVER_")}
    env["QUOTASERVER_ADMIN_TOKEN"] = ADMIN
    env["QUOTASERVER_THROTTLE_CPU_BANDS"] = "[[100, 1.0]]"
    env["QUOTASERVER_THROTTLE_MEMORY_BANDS"] = "[[100, 1.0]]"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quotaserver", "--config", str(config),
        "--port", str(free_port()),
        cwd=str(tmp_path), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    lines = []
    while "listening on" not in (lines[-1] if lines else ""):
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line, "".join(lines)
        lines.append(line)
    proc.url = re.search(r"http://\S+", lines[-1]).group(0)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.gen_test(timeout=60)
async def test_stuck_plugin_threads_do_not_keep_the_server_from_stopping(tmp_path, sig):
    directory = plugin_dir(tmp_path, stuck=STUCK)
    proc = await start_server(
        tmp_path,
        f"""
        plugins_dir: {directory}
        server: {{shutdown_timeout: 6}}
        plugins: {{system_metrics: {{enabled: false}}}}
        """,
    )
    assert (await consume(proc, "nia", token=ADMIN)).code == 200
    proc.send_signal(sig)
    try:
        status = await asyncio.wait_for(proc.wait(), 6 + 2)
    except TimeoutError:
        proc.kill()
        raise AssertionError("the server did not stop within server.shutdown_timeout") from None
    output = (await proc.stdout.read()).decode()
    assert status == 0, output
    assert "Traceback" not in output
    assert "exiting without waiting for threads: plugin-own-thread" in output


@pytest.mark.gen_test(timeout=60)
async def test_a_plugin_ignoring_cancellation_cannot_keep_the_process_alive(tmp_path):
    proc = await start_server(
        tmp_path,
        f"""
        plugins_dir: {plugin_dir(tmp_path, deaf=DEAF)}
        server: {{shutdown_timeout: 3}}
        plugins: {{system_metrics: {{enabled: false}}}}
        """,
    )
    proc.send_signal(signal.SIGINT)
    try:
        status = await asyncio.wait_for(proc.wait(), 3 + 1 + 2)
    except TimeoutError:
        proc.kill()
        raise AssertionError("the exit guard did not end the process") from None
    output = (await proc.stdout.read()).decode()
    assert status == 1
    assert "a plugin is stuck" in output and "Traceback" not in output


@pytest.mark.gen_test(timeout=60)
async def test_a_lone_hung_implementation_times_out_too(app_factory, tmp_path):
    # The only awaitable on_violation: awaited in place rather than as a task.
    app = await app_factory(
        plugins_dir=plugin_dir(tmp_path, zz_hung=HUNG),
        plugins={"alert_engine": {"enabled": False}},
        plugin_timeout=0.2,
    )
    await violate(app, "olga")
    await violate(app, "pete")
    failure = ("zz_hung", "on_violation")
    await wait_for(
        lambda: failure in app.hooks.failures and app.hooks.failures[failure].timeouts == 2
    )
    assert app.plugin_state("zz_hung")["entered"] == 2
    assert app.hooks.failures[failure].last_error == "timed out"


def test_a_pool_is_bounded_and_its_idle_threads_end():
    pool = ThreadPool("bounded-pool-test", 2, idle=0.05)
    gate = threading.Event()
    futures = [pool.submit(gate.wait, 30) for _ in range(5)]

    def threads():
        return [t for t in threading.enumerate() if t.name.startswith("bounded-pool-test")]

    poll(lambda: pool.busy == 2, "two busy threads")
    assert len(threads()) == 2 and all(t.daemon for t in threads())
    gate.set()
    assert [f.result(10) for f in futures] == [True] * 5
    poll(lambda: not threads(), "idle threads ended")
    assert pool.submit(lambda: 7).result(10) == 7  # and start again on demand
    pool.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(lambda: 8)


def poll(condition, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not reached: {what}"
        time.sleep(0.01)


@pytest.mark.gen_test(timeout=30)
async def test_stopping_one_app_arms_no_process_wide_exit_guard(app_factory):
    """The exit guard belongs to a serve process, not to an app: two apps in one process,
    one stopped, and the process is not marked as stopping (the other keeps serving)."""
    first = await app_factory()
    second = await app_factory(database__url=first.config["database.url"])
    await first.stop()
    assert not isolation.stop_requested.is_set()
    assert (await consume(second, "ann")).code == 200
