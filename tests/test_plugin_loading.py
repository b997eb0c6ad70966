"""Loud, early plugin load errors (exit 2, one line) and plugin settings from the environment."""

import os
import subprocess
import sys
import textwrap

import pytest
from plugin_files import plugin_dir
from services import free_port

COMMANDS = {
    "serve": lambda: ["serve", "--port", str(free_port())],
    "check-config": lambda: ["check-config"],
}

QUEUE = """
from quotaserver import PeriodicEmitter, hookimpl

@hookimpl
def register_emitters(app):
    return [PeriodicEmitter("queue", 60, lambda: 1, stats_field="{field}")]
"""


def run(tmp_path, command, config="", env=None, timeout=60):
    """``python -m quotaserver <command>`` in ``tmp_path``; (status, stdout, stderr)."""
    path = tmp_path / "quotaserver.yaml"
    path.write_text(textwrap.dedent(config))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QUOTASERVER_")}
    clean.update(env or {})
    args = [sys.executable, "-m", "quotaserver", *COMMANDS[command](), "--config", str(path)]
    done = subprocess.run(
        args, cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=timeout
    )
    return done.returncode, done.stdout, done.stderr


def one_line(stderr):
    # serve logs its start-up (database migrations) before an emitter clash shows
    lines = [line for line in stderr.splitlines() if line.strip() and " INFO " not in line]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def broken_entry_point(tmp_path):
    """An installed distribution whose quotaserver entry point names a missing module."""
    site = tmp_path / "site"
    info = site / "broken_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[quotaserver]\nbroken_ep = no_such_module_q7\n")
    return {"PYTHONPATH": str(site)}


@pytest.mark.parametrize("command", COMMANDS)
def test_a_plugin_file_that_fails_to_import_stops_with_exit_2(tmp_path, command):
    directory = plugin_dir(tmp_path, broken="import no_such_module_q8\n")
    status, out, err = run(tmp_path, command, f"plugins_dir: {directory}\n")
    assert status == 2
    line = one_line(err)
    assert line.startswith("quotaserver: plugin error: plugin broken (file ")
    assert line.endswith(
        "failed to import: ModuleNotFoundError: No module named 'no_such_module_q8'"
    )
    assert "listening" not in out
    assert not (tmp_path / "data").exists()  # stopped before creating the database


@pytest.mark.parametrize("command", COMMANDS)
def test_an_entry_point_that_fails_to_import_stops_with_exit_2(tmp_path, command):
    status, _out, err = run(tmp_path, command, env=broken_entry_point(tmp_path))
    assert status == 2
    assert one_line(err) == (
        "quotaserver: plugin error: plugin broken_ep (entry point no_such_module_q7) failed to "
        "import: ModuleNotFoundError: No module named 'no_such_module_q7'"
    )


def test_the_debug_log_level_shows_the_traceback(tmp_path):
    directory = plugin_dir(tmp_path, broken="import no_such_module_q8\n")
    status, _out, err = run(
        tmp_path, "check-config", f"plugins_dir: {directory}\nserver: {{log_level: debug}}\n"
    )
    assert status == 2
    assert "Traceback" in err and "no_such_module_q8" in err
    assert err.strip().splitlines()[-1].startswith("quotaserver: plugin error: plugin broken")


def test_enabled_false_skips_a_broken_plugin(tmp_path):
    directory = plugin_dir(tmp_path, broken="import no_such_module_q8\n")
    config = f"plugins_dir: {directory}\nplugins: {{broken: {{enabled: false}}}}\n"
    status, out, err = run(tmp_path, "check-config", config)
    assert status == 0, err
    assert "broken" not in out.split("# plugins")[1]
    env = broken_entry_point(tmp_path)
    env["QUOTASERVER_PLUGINS_BROKEN_EP_ENABLED"] = "false"
    status, _out, err = run(tmp_path, "check-config", env=env)
    assert status == 0, err


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_hook_name_stops_with_exit_2(tmp_path, command):
    typo = "from quotaserver import hookimpl\n\n@hookimpl\ndef on_violaton(app, violation): ...\n"
    status, _out, err = run(tmp_path, command, f"plugins_dir: {plugin_dir(tmp_path, typo=typo)}\n")
    assert status == 2
    line = one_line(err)
    assert line.startswith("quotaserver: plugin error: plugin typo (file ")
    assert line.endswith("unknown hook on_violaton (did you mean on_violation?)")


@pytest.mark.parametrize("command", COMMANDS)
def test_a_duplicate_emitter_stops_with_exit_2_naming_both_plugins(tmp_path, command):
    first = QUEUE.format(field="queue_a")
    second = QUEUE.format(field="queue_b")
    directory = plugin_dir(tmp_path, first=first, second=second)
    status, out, err = run(tmp_path, command, f"plugins_dir: {directory}\n")
    assert status == 2, out + err
    assert one_line(err).endswith(
        "plugin first: duplicate emitter name 'queue' (already registered by plugin second)"
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_a_stats_field_claimed_by_two_plugins_stops_with_exit_2(tmp_path, command):
    first = QUEUE.format(field="queue")
    second = QUEUE.format(field="queue").replace('"queue", 60', '"queue_two", 60')
    directory = plugin_dir(tmp_path, first=first, second=second)
    status, _out, err = run(tmp_path, command, f"plugins_dir: {directory}\n")
    assert status == 2
    assert one_line(err).endswith("stats field 'queue' is claimed by plugins first and second")


def test_a_stats_fields_hook_clashing_with_a_builtin_stops_start_up(tmp_path):
    clash = """
from quotaserver import hookimpl

@hookimpl
def stats_fields(app):
    return {"total_users": -1}
"""
    status, _out, err = run(tmp_path, "serve", f"plugins_dir: {plugin_dir(tmp_path, c=clash)}\n")
    assert status == 2
    line = one_line(err)
    assert line.endswith("stats field 'total_users' is claimed by plugins c and quota_analytics")


def test_plugin_settings_from_the_environment(tmp_path):
    env = {
        "QUOTASERVER_PLUGINS_ALERT_ENGINE_CHECK_INTERVAL": "7",  # longest name: alert_engine
        "QUOTASERVER_PLUGINS_SYSTEM_METRICS__INTERVAL": "0.5",  # __ splits explicitly
        "QUOTASERVER_PLUGINS_QUOTA_ANALYTICS_ENABLED": "false",
    }
    status, out, err = run(tmp_path, "check-config", env=env)
    assert status == 0, err
    assert "  alert_engine:\n    check_interval: 7\n" in out
    assert "  system_metrics:\n    interval: 0.5\n" in out
    assert "quota_analytics" not in out.split("# plugins")[1]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "QUOTASERVER_PLUGINS_ALERT_ENGINE_CHECK_INTERVAL",
            "-1",
            "plugins.alert_engine.check_interval: must be a positive number, got -1",
        ),
        ("QUOTASERVER_PLUGINS_NOPE_X", "1", "QUOTASERVER_PLUGINS_NOPE_X: names no plugin"),
        (
            "QUOTASERVER_PLUGINS_ALERT_ENGINE_ENABLED",
            "maybe",
            "plugins.alert_engine.enabled: expected bool",
        ),
    ],
)
def test_bad_plugin_settings_from_the_environment_exit_2(tmp_path, name, value, message):
    status, _out, err = run(tmp_path, "check-config", env={name: value})
    assert status == 2
    assert message in one_line(err)


def test_an_implementation_with_arguments_the_spec_lacks_stops_with_one_line(tmp_path):
    bad = "from quotaserver import hookimpl\n\n@hookimpl\ndef on_violation(app, violatoin): ...\n"
    status, _out, err = run(
        tmp_path, "check-config", f"plugins_dir: {plugin_dir(tmp_path, bad=bad)}\n"
    )
    assert status == 2
    line = one_line(err)
    assert line.startswith("quotaserver: plugin error: plugin bad (file ")
    assert "Argument(s) {'violatoin'} are declared in the hookimpl" in line


def test_plugin_timeout_from_the_environment(tmp_path):
    status, out, err = run(tmp_path, "check-config", env={"QUOTASERVER_PLUGIN_TIMEOUT": "2.5"})
    assert status == 0, err
    assert "\nplugin_timeout: 2.5\n" in out
    status, _out, err = run(tmp_path, "check-config", env={"QUOTASERVER_PLUGIN_TIMEOUT": "0"})
    assert status == 2 and "plugin_timeout: must be >= 0.01" in one_line(err)
