"""The author's kit: the public import, ``plugins``, ``new-plugin``, quotaserver.testing, docs."""

import inspect
import json
import os
import re
import subprocess
import sys
import sysconfig
import venv

import pytest
from plugin_files import DOCS, HOOKS

import quotaserver
from quotaserver import hookspecs
from quotaserver.realtime.emitters import EventEmitter, PeriodicEmitter

# Plugin authors get this fixture from the pytest11 entry point (the scaffold test below
# proves that); imported here too so a stale egg-info in a checkout cannot hide it.
from quotaserver.testing import ServerDidNotStart, quotaserver_server  # noqa: F401, F811

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quotaserver_cli(*args, cwd, env=None):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QUOTASERVER_")}
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "quotaserver", *args],
        cwd=cwd, env=clean, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_one_public_import_for_authors():
    assert quotaserver.PeriodicEmitter is PeriodicEmitter
    assert quotaserver.EventEmitter is EventEmitter
    assert set(quotaserver.__all__) >= {"hookimpl", "PeriodicEmitter", "EventEmitter"}
    with open(
        os.path.join(ROOT, "plugins", "example_disk_usage", "quotaserver_disk_usage.py")
    ) as fh:
        example = fh.read()
    assert "from quotaserver import PeriodicEmitter, hookimpl" in example
    assert "pluggy" not in example


def test_plugins_command_lists_name_version_source_hooks(tmp_path):
    directory = tmp_path / "extra"
    directory.mkdir()
    (directory / "queue.py").write_text(
        "from quotaserver import EventEmitter, PeriodicEmitter, hookimpl\n__version__ = '2.1'\n\n"
        "@hookimpl\ndef register_event_types():\n    return ['queue_alarm']\n\n"
        "@hookimpl\ndef register_emitters(app):\n"
        "    return [EventEmitter('queue', lambda emit: None, event_types=('queue_full',)),\n"
        "            PeriodicEmitter('queue_depth', 5, lambda: 3, stats_field='depth')]\n\n"
        "@hookimpl\ndef stats_fields(app):\n    return {'queue_backlog': 0}\n\n"
        "@hookimpl\ndef secret_settings():\n    return ['api_key']\n"
    )
    config = tmp_path / "q.yaml"
    config.write_text(
        f"plugins_dir: {directory}\nplugins: {{quota_analytics: {{enabled: false}},"
        " queue: {limit: 7, api_key: s3cret-key}}\n"
    )
    listed = quotaserver_cli("plugins", "--json", "--config", str(config), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    plugins = {p["name"]: p for p in json.loads(listed.stdout)["plugins"]}
    assert plugins["queue"] == {
        "name": "queue",
        "version": "2.1",
        "source": "file",
        "origin": str(directory / "queue.py"),
        "hooks": ["register_emitters", "register_event_types", "secret_settings", "stats_fields"],
        "event_types": ["queue_alarm", "queue_full"],
        "emitters": [
            {"name": "queue_depth", "kind": "periodic", "interval": 5, "stats_field": "depth"},
            {"name": "queue", "kind": "event", "event_types": ["queue_full"]},
        ],
        "stats_fields": ["queue_backlog"],
        "settings": {"limit": 7, "api_key": "<redacted>"},
    }
    assert "s3cret-key" not in listed.stdout
    assert plugins["alert_engine"]["source"] == "built-in"
    assert plugins["alert_engine"]["version"] == quotaserver.__version__
    assert "quota_analytics" not in plugins
    text = quotaserver_cli("plugins", "--config", str(config), cwd=tmp_path)
    assert f"queue 2.1 (file: {directory / 'queue.py'})\n" in text.stdout
    assert "  event types: queue_alarm, queue_full\n" in text.stdout
    assert "  emitter: queue_depth (periodic every 5 s, stats field depth)\n" in text.stdout
    assert "  emitter: queue (event)\n" in text.stdout
    assert "  stats fields: queue_backlog\n" in text.stdout
    checked = quotaserver_cli("check-config", "--config", str(config), cwd=tmp_path)
    assert checked.returncode == 0
    assert "# plugins\n" in checked.stdout and "#   queue 2.1 (file:" in checked.stdout


def test_new_plugin_refuses_bad_names_and_used_directories(tmp_path):
    bad = quotaserver_cli("new-plugin", "Queue-Depth", "--dir", str(tmp_path / "x"), cwd=tmp_path)
    assert bad.returncode == 2 and "invalid name 'Queue-Depth'" in bad.stderr
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    used = quotaserver_cli("new-plugin", "queue", "--dir", str(tmp_path / "used"), cwd=tmp_path)
    assert used.returncode == 2 and "is not an empty directory" in used.stderr
    assert os.listdir(tmp_path / "used") == ["keep.txt"]


def test_new_plugin_installs_and_its_own_tests_pass(tmp_path):
    """new-plugin, pip install -e (offline) into a fresh venv, the package's own pytest."""
    package = tmp_path / "queue-depth"
    made = quotaserver_cli("new-plugin", "queue_depth", "--dir", str(package), cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert sorted(os.listdir(package)) == [
        "README.md",
        "pyproject.toml",
        "quotaserver_queue_depth.py",
        "tests",
    ]
    # A venv of its own that sees this one's packages (pytest, quotaserver, setuptools):
    # installing the scaffold here must not register it in the project's environment.
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = str(env_dir / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    with open(os.path.join(site, "parent-env.pth"), "w") as fh:
        # addsitedir, not a bare path: the parent's own .pth files (editable installs) count
        parent = sysconfig.get_paths()["purelib"]
        fh.write(f"import site; site.addsitedir({parent!r})\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUOTASERVER_", "PIP_"))}
    install = subprocess.run(
        [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "-q", "-e", str(package)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    listed = subprocess.run(
        [python, "-m", "quotaserver", "plugins", "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    plugins = {p["name"]: p for p in json.loads(listed.stdout)["plugins"]}
    assert plugins["queue_depth"]["source"] == "entry point"
    tests = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=package, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert "2 passed" in tests.stdout
    # Not registered in this (the project's) environment.
    import importlib.metadata

    assert "queue_depth" not in {
        ep.name for ep in importlib.metadata.entry_points(group="quotaserver")
    }


def test_the_testing_plugin_starts_the_real_server_and_merges_stats(quotaserver_server):  # noqa: F811
    server = quotaserver_server(plugins={"alert_engine": {"enabled": False}})
    assert "alert_engine" not in server.plugin_names()
    with server.stream() as stream:
        first = stream.wait_for_stats(lambda s: "commands_today" in s)
        assert first["commands_today"] == 0
        assert server.consume("una")[0] == 200
        merged = stream.wait_for_stats(lambda s: s["commands_today"] == 1)
        # A delta carries only what changed; the merged view keeps every field.
        assert set(merged) >= set(first) and "delta" not in merged
        assert server.consume("una", count=10**6)[0] in (400, 429)
    assert server.stop() == 0


@pytest.mark.parametrize("attempt", range(4))  # a refusal races the end of the output
def test_a_refused_config_raises_server_did_not_start_with_the_reason(
    quotaserver_server,  # noqa: F811
    attempt,
):
    with pytest.raises(ServerDidNotStart) as refused:
        quotaserver_server(plugins={"system_metrics": {"interval": -1}})
    assert refused.value.status == 2
    assert "plugins.system_metrics.interval" in refused.value.output
    assert "Traceback" not in refused.value.output


def test_only_loads_just_the_plugins_under_test(quotaserver_server):  # noqa: F811
    server = quotaserver_server(only=["disk_usage"])
    assert server.plugin_names() == {"disk_usage"}


def _documented_signatures():
    with open(DOCS) as fh:
        text = fh.read()
    return dict(re.findall(r"^### `(\w+)\((.*?)\)`", text, re.M))


@pytest.mark.parametrize("hook", HOOKS)
def test_each_documented_signature_matches_the_spec(hook):
    documented = _documented_signatures()
    assert hook in documented, f"docs/plugins.md has no section for {hook}"
    spec = list(inspect.signature(getattr(hookspecs, hook)).parameters)
    written = [a.strip() for a in documented[hook].split(",") if a.strip()]
    assert written == spec, f"{hook}: documented ({', '.join(written)}), spec ({', '.join(spec)})"


def test_docs_have_the_author_sections():
    with open(DOCS) as fh:
        text = fh.read()
    for heading in ("## Testing your plugin", "## Publishing your plugin"):
        assert heading in text
    documented = set(_documented_signatures())
    assert documented <= set(HOOKS), f"documented hooks not in the spec: {documented - set(HOOKS)}"
