"""The plugin contract: every hook is documented and tested here; failures stay local."""

import asyncio
import re
import signal
import sys
import textwrap
import threading

import pytest
from clients import VIEWER, call, consume, ws_connect
from plugin_files import DOCS, HOOKS, plugin_dir
from services import start_server, write_config
from waits import wait_until, wait_until_async, wait_until_sync

from quotaserver.config import ConfigError, load_config
from quotaserver.plugins import PluginError, get_plugin_manager, secret_settings

RECORDER = """
from quotaserver import MetricSample, hookimpl
from quotaserver.realtime.emitters import EventEmitter, PeriodicEmitter

NAME = "recorder"

def _calls(app):
    return app.plugin_state(NAME).setdefault("calls", [])

@hookimpl
async def startup(app):
    await asyncio_sleep0()
    # Whether the server was listening yet: startup is awaited before it is.
    _calls(app).append(("startup", app.server is not None))

async def asyncio_sleep0():
    import asyncio
    await asyncio.sleep(0)

@hookimpl
def shutdown(app):
    app.plugin_state(NAME).setdefault("order", []).append("shutdown hook")
    with open(app.plugin_config(NAME)["marker"], "w") as fh:
        fh.write("shutdown")

@hookimpl
def stats_fields(app):
    return {"recorder_calls": len(_calls(app))}

@hookimpl
def on_decision(app, decision):
    _calls(app).append(("decision", decision.user, decision.allowed, decision.reason))

@hookimpl
async def on_violation(app, violation):
    _calls(app).append(("violation", violation["username"], violation["attempted"]))

@hookimpl
def on_event(app, message):
    _calls(app).append(("event", message.type, message.seq))

@hookimpl
def health_fields(app):
    return {"calls": len(_calls(app)), "healthy": app.plugin_state(NAME).get("healthy", True)}

@hookimpl
def metric_samples(app):
    decisions = len([c for c in _calls(app) if c[0] == "decision"])
    samples = [
        MetricSample("quotaserver_recorder_decisions", decisions, {"source": "hook"},
                     "Decisions the recorder saw.", "counter"),
        MetricSample("quotaserver_recorder_ready", 1),
    ]
    if app.plugin_state(NAME).get("foreign_metric"):
        samples.append(MetricSample("quotaserver_throttle_factor", 0))  # not its name
    return samples

@hookimpl
def register_emitters(app):
    state = app.plugin_state(NAME)

    async def start(emit):
        state["emit"] = emit

    def stop():
        state.setdefault("order", []).append("emitter stop")

    ticks = iter(range(10**9))
    return [
        PeriodicEmitter("recorder_ticks", 0.05, lambda: next(ticks), stats_field="ticks"),
        EventEmitter("recorder_events", start, stop, event_types=("custom_note",)),
    ]
"""

FAULTY = """
import threading, time
from quotaserver import hookimpl
from quotaserver.realtime.emitters import PeriodicEmitter

released = threading.Event()

def boom():
    raise RuntimeError("sensor on fire")

def hang():
    released.wait(60)

@hookimpl
def shutdown(app):
    released.set()  # the hung sensor comes back: its thread ends with the server

@hookimpl
def register_emitters(app):
    return [
        PeriodicEmitter("raising_source", 0.05, boom),
        PeriodicEmitter("hanging_source", 0.1, hang, blocking=True, timeout=0.2),
    ]

@hookimpl
def stats_fields(app):
    raise ValueError("stats broken")

@hookimpl
def on_decision(app, decision):
    raise KeyError("decision broken")
"""


async def recorder_app(app_factory, tmp_path, **overrides):
    marker = tmp_path / "shutdown-marker"
    app = await app_factory(
        plugins_dir=plugin_dir(tmp_path, recorder=RECORDER),
        plugins={"recorder": {"marker": str(marker)}, "alert_engine": {"enabled": False}},
        realtime__stats_interval=0.05,
        **overrides,
    )
    await app.rules.set_global_limits("shell", {"daily": 1}, actor="test")
    return app, marker


def calls(app):
    return app.plugin_state("recorder").get("calls", [])


# -- one test per hook (test_every_hook_has_a_test enforces it) --------------------------


@pytest.mark.gen_test(timeout=30)
async def test_hook_startup(app_factory, tmp_path):
    app, _ = await recorder_app(app_factory, tmp_path)
    assert calls(app)[0] == ("startup", False)  # awaited before the server started serving
    assert app.server is not None


@pytest.mark.gen_test(timeout=30)
async def test_hook_shutdown(app_factory, tmp_path):
    app, marker = await recorder_app(app_factory, tmp_path)
    await app.stop()
    assert marker.read_text() == "shutdown"
    assert app.plugin_state("recorder")["order"] == ["emitter stop", "shutdown hook"]


@pytest.mark.gen_test(timeout=30)
async def test_hook_stats_fields(app_factory, tmp_path):
    app, _ = await recorder_app(app_factory, tmp_path)
    ws = await ws_connect(app)
    snapshot = await ws.recv_type("stats")
    assert "recorder_calls" in snapshot["data"]
    await consume(app, "ann")
    delta = await ws.recv_type("stats")
    while delta["data"].get("recorder_calls", 0) < 2:
        delta = await ws.recv_type("stats")
    ws.close()


@pytest.mark.gen_test(timeout=30)
async def test_hook_on_decision(app_factory, tmp_path):
    app, _ = await recorder_app(app_factory, tmp_path)
    await consume(app, "ben")
    await consume(app, "ben")
    await wait_until(
        lambda: len([c for c in calls(app) if c[0] == "decision"]) == 2, "two decisions"
    )
    decisions = [c for c in calls(app) if c[0] == "decision"]
    assert decisions == [
        ("decision", "ben", True, None),
        ("decision", "ben", False, "quota_exceeded"),
    ]


@pytest.mark.gen_test(timeout=30)
async def test_hook_on_violation(app_factory, tmp_path):
    app, _ = await recorder_app(app_factory, tmp_path)
    await consume(app, "cat", count=3)
    await wait_until(lambda: any(c[0] == "violation" for c in calls(app)), "the violation hook")
    assert ("violation", "cat", 3) in calls(app)


@pytest.mark.gen_test(timeout=30)
async def test_hook_on_event(app_factory, tmp_path):
    app, _ = await recorder_app(app_factory, tmp_path)
    message = await app.publish_event("quota_change", {"x": 1})
    await wait_until(lambda: ("event", "quota_change", message.seq) in calls(app), "the event hook")


@pytest.mark.gen_test(timeout=30)
async def test_hook_health_fields(app_factory, tmp_path):
    app, _ = await recorder_app(app_factory, tmp_path)
    await consume(app, "dan")
    await wait_until(lambda: any(c[0] == "decision" for c in calls(app)), "the decision")
    health = (await call(app, "GET", "/api/ws/health", token=VIEWER)).json
    assert health["plugins_health"]["recorder"]["calls"] >= 1
    assert health["status"] == "ok"
    app.plugin_state("recorder")["healthy"] = False  # the plugin reports a problem
    health = (await call(app, "GET", "/api/ws/health", token=VIEWER)).json
    assert health["plugins_health"]["recorder"]["healthy"] is False
    assert health["status"] == "degraded"


@pytest.mark.gen_test(timeout=30)
async def test_hook_metric_samples(app_factory, tmp_path):
    from scrape import scrape, value

    app, _ = await recorder_app(app_factory, tmp_path)
    await consume(app, "eli")
    await consume(app, "eli")
    await wait_until(
        lambda: len([c for c in calls(app) if c[0] == "decision"]) == 2, "two decisions"
    )
    got = await scrape(app)
    assert value(got, "quotaserver_recorder_decisions_total", source="hook") == 2
    assert value(got, "quotaserver_recorder_ready") == 1
    # A name outside the plugin's prefix is refused: the core's gauge keeps its own value.
    app.plugin_state("recorder")["foreign_metric"] = True
    got = await scrape(app)
    assert value(got, "quotaserver_throttle_factor") == 1.0
    failures = [f for f in app.hooks.failures_json("recorder") if f["hook"] == "metric_samples"]
    assert failures and "quotaserver_recorder_" in failures[0]["error"]


@pytest.mark.gen_test(timeout=30)
async def test_hook_register_emitters(app_factory, tmp_path):
    app, _ = await recorder_app(app_factory, tmp_path)
    # Periodic: its value becomes a stats field.
    ws = await ws_connect(app, "types=stats,custom_note")
    await wait_until(lambda: app.scheduler.sources["recorder_ticks"].runs >= 3, "three ticks")
    stats = await ws.recv_type("stats")
    while "ticks" not in stats["data"]:
        stats = await ws.recv_type("stats")
    # Event-driven: emit persists, then publishes, with a seq.
    emit = app.plugin_state("recorder")["emit"]
    message = await emit("custom_note", {"text": "hello"})
    got = await ws.recv_type("custom_note")
    assert got["seq"] == message.seq and got["data"] == {"text": "hello"}
    health = await call(app, "GET", "/api/ws/health", token=VIEWER)
    names = {s["name"]: s for s in health.json["sources"]}
    assert names["recorder_ticks"]["healthy"] and names["recorder_events"]["kind"] == "event"
    ws.close()


@pytest.mark.gen_test(timeout=60)
async def test_hook_config_reloaded(tmp_path):
    # Through SIGHUP on a real process: the hook sees the new block, after validate_config.
    marker = tmp_path / "reloaded.txt"
    watcher = f"""
    from quotaserver import hookimpl

    @hookimpl
    def validate_config(config):
        level = config.plugin("watcher").get("level")
        return [] if level in (None, 1, 2) else ["plugins.watcher.level: must be 1 or 2"]

    @hookimpl
    def config_reloaded(app, config):
        with open({str(marker)!r}, "a") as fh:
            fh.write(f"{{config.plugin('watcher')['level']}}\\n")
    """
    settings = {
        "plugins_dir": plugin_dir(tmp_path, watcher=watcher),
        "throttle": {"source": "off"},
        "plugins": {"watcher": {"level": 1}},
    }
    server = await start_server(
        str(tmp_path), settings, env={"QUOTASERVER_ADMIN_TOKEN": "an-admin-token-for-reloads"}
    )
    try:
        (path,) = tmp_path.glob("config-*.yaml")
        for level in (2, 3):  # 3 is refused by validate_config: no call
            write_config(str(path), {**settings, "plugins": {"watcher": {"level": level}}})
            server.send_signal(signal.SIGHUP)
            done = "configuration reloaded" if level == 2 else "configuration not reloaded"
            await wait_until(lambda d=done: any(d in line for line in server.output), done)
        assert marker.read_text() == "2\n"
        assert any("plugins.watcher.level: must be 1 or 2" in line for line in server.output)
    finally:
        assert await server.stop() == 0


def test_hook_secret_settings(tmp_path):
    # check-config's redaction of the declared settings: tests/test_check_config.py.
    notifier = """
    from quotaserver import hookimpl

    @hookimpl
    def secret_settings():
        return ["webhook_url"]
    """
    broken = """
    from quotaserver import hookimpl

    @hookimpl
    def secret_settings():
        return "webhook_url"
    """
    config = load_config(env={}).with_overrides(plugins_dir=plugin_dir(tmp_path, notifier=notifier))
    assert secret_settings(get_plugin_manager(config)) == {"notifier": frozenset({"webhook_url"})}
    (tmp_path / "plugins" / "notifier.py").write_text(textwrap.dedent(broken))
    with pytest.raises(PluginError, match="notifier: secret_settings: a list of names"):
        secret_settings(get_plugin_manager(config))


@pytest.mark.gen_test(timeout=30)
async def test_hook_register_event_types(app_factory, tmp_path):
    declares = """
from quotaserver import hookimpl

@hookimpl
def register_event_types():
    return ["queue_alarm"]

@hookimpl
async def on_event(app, message):
    if message.type == "quota_change":
        await app.publish_event("queue_alarm", {"depth": 7})
"""
    app = await app_factory(plugins_dir=plugin_dir(tmp_path, declares=declares))
    listed = (await call(app, "GET", "/api/plugins", token=VIEWER)).json
    # quota_analytics (built in) declares its live-only "usage" event.
    assert listed["event_types"] == ["queue_alarm", "usage"]
    assert [p["event_types"] for p in listed["plugins"] if p["name"] == "declares"] == [
        ["queue_alarm"]
    ]
    ws = await ws_connect(app, "types=queue_alarm")
    await app.publish_event("quota_change", {"x": 1})
    alarm = await ws.recv_type("queue_alarm")
    assert alarm["data"] == {"depth": 7} and alarm["seq"] > 0
    ws.close()


def test_hook_validate_config(tmp_path):
    checker = """
from quotaserver import hookimpl

@hookimpl
def validate_config(config):
    if config.plugin("checker").get("level", 1) > 3:
        return ["plugins.checker.level: must be at most 3"]
    return []
"""
    breaks = """
from quotaserver import hookimpl

@hookimpl
def validate_config(config):
    raise RuntimeError("validator crashed")
"""
    directory = plugin_dir(tmp_path, checker=checker)
    config = load_config(env={}).with_overrides(plugins_dir=directory)
    config.plugins = {"checker": {"level": 2}}
    assert get_plugin_manager(config).has_plugin("checker")
    config.plugins = {"checker": {"level": 9}}
    with pytest.raises(ConfigError, match=r"^plugins\.checker\.level: must be at most 3"):
        get_plugin_manager(config)
    config.plugins = {"checker": {"level": 9, "enabled": False}}  # disabled: not consulted
    assert not get_plugin_manager(config).has_plugin("checker")
    broken = load_config(env={}).with_overrides(plugins_dir=plugin_dir(tmp_path, breaks=breaks))
    with pytest.raises(ConfigError, match="plugins.breaks: RuntimeError: validator crashed"):
        get_plugin_manager(broken)


# -- failures stay local ------------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_raising_and_hanging_plugins_are_isolated(app_factory, tmp_path):
    app = await app_factory(
        plugins_dir=plugin_dir(tmp_path, faulty=FAULTY),
        realtime__stats_interval=0.05,
        realtime__heartbeat_interval=0.1,
    )
    ws = await ws_connect(app)
    await ws.recv_type("welcome")
    await wait_until(
        lambda: app.scheduler.sources["hanging_source"].failures >= 1,
        "the hanging source to time out",
    )
    await wait_until(
        lambda: app.scheduler.sources["raising_source"].failures >= 2,
        "two failures of the raising source",
    )
    health = (await call(app, "GET", "/api/ws/health", token=VIEWER)).json
    sources = {s["name"]: s for s in health["sources"]}
    assert health["status"] == "degraded"
    assert sources["raising_source"]["healthy"] is False
    assert "sensor on fire" in sources["raising_source"]["last_error"]
    assert sources["hanging_source"]["last_error"] == "timed out"
    assert sources["alert_rules"]["healthy"] is True
    assert "faulty" in health["plugin_errors"]
    # Everything else goes on: quotas, the built-in stats, heartbeats, other clients.
    assert (await consume(app, "dee")).code == 200
    stats = await ws.recv_type("stats")
    while stats["data"].get("commands_today") != 1:  # the analytics plugin keeps counting
        stats = await ws.recv_type("stats")
    await ws.recv_type("ping")
    ws.close()
    # Stopping the server releases the hung sensor: no thread outlives the test.
    await app.stop()
    wait_until_sync(
        lambda: not [t for t in threading.enumerate() if t.name.startswith("emitter-hanging")],
        "the hung emitter thread to end",
    )


@pytest.mark.gen_test(timeout=30)
async def test_enabled_false_turns_off_a_builtin(app_factory):
    app = await app_factory(plugins={"alert_engine": {"enabled": False}})
    listed = await call(app, "GET", "/api/plugins", token=VIEWER)
    names = {p["name"] for p in listed.json["plugins"]}
    assert "alert_engine" not in names
    assert {"quota_analytics"} <= names
    assert "alert_rules" not in app.scheduler.sources


@pytest.mark.gen_test(timeout=30)
async def test_third_party_entry_point_plugin_disk_usage(app_factory, tmp_path):
    pytest.importorskip("quotaserver_disk_usage", reason="install plugins/example_disk_usage")
    # A long interval: the scheduler samples once at start, the test runs the next one (a
    # short interval made run_once collide with a scheduled run still in progress).
    app = await app_factory(plugins={"disk_usage": {"path": str(tmp_path), "interval": 3600}})
    listed = await call(app, "GET", "/api/plugins", token=VIEWER)
    disk = [p for p in listed.json["plugins"] if p["name"] == "disk_usage"]
    assert (
        disk
        and disk[0]["version"] == "0.1.0"
        and disk[0]["hooks"] == ["register_emitters", "validate_config"]
    )
    await wait_until(lambda: app.scheduler.sources["disk_usage"].runs == 1, "the first sample")
    value = await app.scheduler.run_once("disk_usage")
    assert app.scheduler.sources["disk_usage"].runs == 2
    assert value["path"] == str(tmp_path) and 0 <= value["percent"] <= 100
    assert app.stats_snapshot()["disk"] == value


def test_get_plugin_manager_is_a_fresh_factory():
    first, second = get_plugin_manager(), get_plugin_manager()
    assert first is not second
    assert first.has_plugin("quota_analytics") and second.has_plugin("quota_analytics")


def test_every_hook_has_a_test():
    module = sys.modules[__name__]
    missing = [h for h in HOOKS if not hasattr(module, f"test_hook_{h}")]
    assert HOOKS and not missing, f"hooks without a test: {missing}"


def test_every_hook_is_documented_with_signature_and_example():
    with open(DOCS) as fh:
        text = fh.read()
    for hook in HOOKS:
        section = re.search(rf"^### `{hook}\((.*?)\)`(.*?)(?=^### |\Z)", text, re.M | re.S)
        assert section, f"docs/plugins.md has no section for {hook}"
        assert "```python" in section.group(2), f"{hook}: no example"
        assert "When" in section.group(2) or "when" in section.group(2), f"{hook}: no timing"


@pytest.mark.gen_test(timeout=30)
async def test_plugin_storage_outlives_a_restart_and_read_events_is_the_outbox(app_factory):
    app = await app_factory()
    first = await app.publish_event("quota_change", {"n": 1})
    second = await app.publish_event("quota_change", {"n": 2})
    assert [m.data["n"] for m in await app.read_events(first.seq - 1)] == [1, 2]
    assert [m.seq for m in await app.read_events(first.seq, limit=5)] == [second.seq]
    assert app.last_seq == second.seq
    await app.plugin_storage.save("my_plugin", "cursor", {"seq": second.seq})
    await app.plugin_storage.save("my_plugin", "cursor", {"seq": second.seq + 1})  # replaces
    await app.plugin_storage.save("other", "cursor", 7)
    with pytest.raises(TypeError):
        await app.plugin_storage.save("my_plugin", "bad", object())  # refused before a write
    await app.stop()
    again = await app_factory()
    assert await again.plugin_storage.load("my_plugin") == {"cursor": {"seq": second.seq + 1}}
    assert await again.plugin_storage.load("other") == {"cursor": 7}


TURNS_BAD = """
import datetime
from quotaserver import hookimpl

@hookimpl
def stats_fields(app):
    if app.plugin_state("turns_bad").get("bad"):
        return {"turns_bad_at": datetime.datetime(2026, 1, 1)}
    return {"turns_bad_at": "fine"}
"""


@pytest.mark.gen_test(timeout=30)
async def test_stats_fields_over_the_payload_limit_fail_that_plugin_only(app_factory, tmp_path):
    big = TURNS_BAD.replace(
        '{"turns_bad_at": datetime.datetime(2026, 1, 1)}', '{"turns_bad_at": "x" * 5000}'
    )
    app = await app_factory(
        plugins_dir=plugin_dir(tmp_path, turns_bad=big),
        plugin_max_payload_bytes=4096,
        realtime__stats_interval=0.05,
    )
    app.plugin_state("turns_bad")["bad"] = True
    # A third party's plain stats_fields runs in its pool: shown from its last run.
    await wait_until(lambda: "turns_bad_at" not in app.stats_snapshot(), "the field dropped")
    assert "system_load" in app.stats_snapshot()
    health = (await call(app, "GET", "/api/plugins")).json
    (plugin,) = [p for p in health["plugins"] if p["name"] == "turns_bad"]
    (failure,) = [f for f in plugin["failures"] if f["hook"] == "stats_fields"]
    assert "stats_fields returned 50" in failure["error"] and "over 4096" in failure["error"]


@pytest.mark.gen_test(timeout=30)
async def test_a_stats_value_that_turns_non_json_fails_that_plugin_not_the_stats(
    app_factory, tmp_path
):
    app = await app_factory(
        plugins_dir=plugin_dir(tmp_path, turns_bad=TURNS_BAD), realtime__stats_interval=0.05
    )
    ws = await ws_connect(app)
    assert (await ws.recv_type("stats"))["data"]["turns_bad_at"] == "fine"
    app.plugin_state("turns_bad")["bad"] = True
    await consume(app, "ann")  # the stats still change, and still reach the client
    stats = await ws.recv_type("stats")
    while stats["data"].get("commands_today", 0) < 1:
        stats = await ws.recv_type("stats")

    async def failure() -> dict | None:
        health = (await call(app, "GET", "/api/plugins")).json
        (plugin,) = [p for p in health["plugins"] if p["name"] == "turns_bad"]
        return next((f for f in plugin["failures"] if f["hook"] == "stats_fields"), None)

    await wait_until_async(failure, "the plugin's stats_fields failing")
    found = await failure()
    assert found["failing"] and "not JSON" in found["error"]
    ws.close()


SLEEPY = """
import time
from quotaserver import PeriodicEmitter, hookimpl

@hookimpl
def stats_fields(app):
    time.sleep(app.plugin_state("sleepy").get("sleep", 0))
    return {"sleepy_value": 1}

def collect():
    time.sleep(3)  # a plain collect without blocking=True: a careless author's
    return {"x": 1}

@hookimpl
def register_emitters(app):
    return [PeriodicEmitter("sleepy_source", 0.2, collect, stats_field="sleepy_source")]
"""


@pytest.mark.gen_test(timeout=60)
async def test_a_third_partys_sleeping_stats_fields_and_collect_stall_no_consume(
    app_factory, tmp_path
):
    import time

    app = await app_factory(
        plugins_dir=plugin_dir(tmp_path, sleepy=SLEEPY),
        realtime__stats_interval=0.05,
        plugin_timeout=1.0,
    )
    app.plugin_state("sleepy")["sleep"] = 2.0  # every stats_fields call from now on: 2 s
    for n in range(10):
        started = time.monotonic()
        assert (await consume(app, f"u{n}")).code == 200
        assert time.monotonic() - started < 1.0  # the loop never waited on the plugin
        await asyncio.sleep(0.1)

    async def blamed() -> bool:
        health = (await call(app, "GET", "/api/ws/health")).json
        hooks = {(f["plugin"], f["hook"]) for f in health["plugin_failures"] if f["failing"]}
        source = next(s for s in health["sources"] if s["name"] == "sleepy_source")
        return ("sleepy", "stats_fields") in hooks and not source["healthy"]

    await wait_until_async(blamed, "the sleepy plugin named for both")
    health = (await call(app, "GET", "/api/ws/health")).json
    assert health["loop_blocks"] == {}  # neither ran on the event loop
    assert app.stats_snapshot()["sleepy_value"] == 1  # still shown, from start-up's call


WRAPPER = """
from quotaserver import hookimpl

@hookimpl(wrapper=True)
def on_decision(app, decision):
    return (yield)
"""

TRACED = """
import asyncio
from quotaserver import hookimpl

@hookimpl
def on_decision(app, decision):
    pass

@hookimpl
async def on_violation(app, violation):
    await asyncio.sleep(0.05)
"""


def test_a_hook_wrapper_is_refused_at_load_in_one_line(tmp_path):
    config = load_config(None, env={}).with_overrides(
        plugins_dir=plugin_dir(tmp_path, wrapping=WRAPPER)
    )
    with pytest.raises(PluginError) as refused:
        get_plugin_manager(config)
    message = str(refused.value)
    assert "plugin wrapping" in message and "on_decision is a hook wrapper" in message
    assert "\n" not in message


@pytest.mark.gen_test(timeout=30)
async def test_trace_plugins_logs_every_hook_call_with_its_plugin_and_duration(
    app_factory, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("QUOTASERVER_TRACE_PLUGINS", "1")
    app = await app_factory(
        plugins_dir=plugin_dir(tmp_path, traced=TRACED),
        quotas__defaults={"shell": {"daily": 0}},
    )
    with caplog.at_level("INFO", logger="quotaserver.plugins"):
        assert (await consume(app, "tia")).code == 429

        def traced(hook: str) -> list[str]:
            return [
                r.getMessage() for r in caplog.records
                if r.getMessage().startswith(f"trace: plugin traced {hook} ")
            ]  # fmt: skip

        await wait_until(lambda: traced("on_violation"), "the awaited hook's line")
    (decision,) = traced("on_decision")  # a third party's plain hook: in its pool
    assert decision.endswith("ms in its pool")
    (violation,) = traced("on_violation")
    assert float(violation.split()[4]) >= 50 and violation.endswith("ms awaited")
