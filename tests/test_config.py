"""Configuration: declared settings, YAML + environment + flags, errors exit 2 naming the key."""

import hashlib
import os
import subprocess
import sys

import pytest
import yaml

from quotaserver.config import SETTINGS, ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "run.py")
DEFAULT_YAML = os.path.join(ROOT, "conf", "quotaserver.yaml")


def run(*args: str, env: dict | None = None, cwd: str | None = None):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTASERVER_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, RUN, *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=60,
    )


def write(tmp_path, text: str) -> str:
    path = tmp_path / "qs.yaml"
    path.write_text(text)
    return str(path)


def test_every_setting_is_declared_with_help_and_documented_in_default_yaml():
    with open(DEFAULT_YAML) as fh:
        text = fh.read()
        data = yaml.safe_load(text)
    for setting in SETTINGS:
        assert setting.help, setting.key
        node = data
        for part in setting.key.split("."):
            assert part in node, f"{setting.key} missing from conf/quotaserver.yaml"
            node = node[part]
    # The documented file is the default: loading it changes nothing.
    assert dict(load_config(DEFAULT_YAML, env={})) == dict(load_config(None, env={}))


def test_environment_and_flags_override_yaml(tmp_path):
    path = write(tmp_path, "server:\n  port: 9000\ndatabase:\n  url: sqlite:///a.db\n")
    cfg = load_config(
        path,
        env={"QUOTASERVER_DATABASE_URL": "sqlite:///b.db", "QUOTASERVER_DEV": "true"},
        overrides={"server.port": 9100},
    )
    assert cfg["database.url"] == "sqlite:///b.db"
    assert cfg["dev"] is True
    assert cfg["server.port"] == 9100
    env_only = load_config(path, env={"QUOTASERVER_SERVER_PORT": "9200"})
    assert env_only["server.port"] == 9200
    nested = load_config(None, env={"QUOTASERVER_REALTIME_STATS_INTERVAL": "1.5"})
    assert nested["realtime.stats_interval"] == 1.5


CONFIG_ERRORS = [
    ("server:\n  prot: 1\n", {}, "server.prot: unknown setting"),
    ("bogus: 1\n", {}, "bogus: unknown setting"),
    ("server:\n  port: eighty\n", {}, "server.port: expected int"),
    ("server:\n  port: 70000\n", {}, "server.port: must be <= 65535"),
    ("realtime:\n  max_connections: 0\n", {}, "realtime.max_connections: must be >= 1"),
    ("dev: yes please\n", {}, "dev: expected bool"),
    ("quotas:\n  timezone: Mars/Olympus\n", {}, "quotas.timezone: unknown time zone"),
    ("quotas:\n  week_start: someday\n", {}, "quotas.week_start: must be one of"),
    ("quotas:\n  defaults:\n    shell: {daily: -1}\n", {}, "quotas.defaults: shell.daily"),
    ("quotas:\n  defaults:\n    shell: {yearly: 5}\n", {}, "unknown period"),
    ("quotas:\n  defaults:\n    deploy: {daily: 5}\n", {}, "quotas.defaults.deploy"),
    ("throttle:\n  cpu_bands: [[120, 0.5]]\n", {}, "throttle.cpu_bands"),
    (
        "throttle:\n  memory_bands: [[90, 0.5], [90, 0.0]]\n",
        {},
        "throttle.memory_bands: each threshold may appear once",
    ),  # fmt: skip
    ("server: [1, 2]\n", {}, "server: must be a mapping"),
    ("- just\n- a list\n", {}, "top level must be a mapping"),
    ("server:\n  port: [unclosed\n", {}, "invalid YAML at line"),
    ("plugins:\n  no_such_plugin: {}\n", {}, "plugins.no_such_plugin: no such plugin"),
    ("plugins:\n  load_history: {}\n", {}, "load history is part of the core now"),
    ("plugins:\n  alert_engine: {enabled: maybe}\n", {}, "plugins.alert_engine.enabled"),
    ("plugins:\n  alert_engine:\n    rules: {bogus: {}}\n", {}, "unknown rule 'bogus'"),
    (
        "plugins:\n  alert_engine:\n    rules:\n      high_utilization: {severity: x}\n",
        {},
        "high_utilization.severity",
    ),  # fmt: skip
    ("plugins:\n  system_metrics: {interval: -1}\n", {}, "plugins.system_metrics.interval"),
    ("quotas:\n  periods: []\n", {}, "quotas.periods: must name at least one period"),
    ("realtime:\n  stats_interval: .nan\n", {}, "realtime.stats_interval: must be a finite"),
    ("realtime:\n  heartbeat_interval: .inf\n", {}, "realtime.heartbeat_interval"),
    ("plugins:\n  system_metrics: {intervall: 2}\n", {}, "plugins.system_metrics.intervall"),
    ("", {"QUOTASERVER_SERVER_PORT": "abc"}, "server.port: expected int"),
    ("", {"QUOTASERVER_NOPE": "1"}, "QUOTASERVER_NOPE: unknown setting"),
    ("database:\n  url: mysql://x/y\n", {}, "database.url"),
]


# Ids without backslashes (the YAML's line breaks): a node id must read back as itself.
@pytest.mark.parametrize(
    ("text", "env", "needle"), CONFIG_ERRORS, ids=[needle for _, _, needle in CONFIG_ERRORS]
)
def test_config_errors_exit_2_with_one_message_naming_the_key(tmp_path, text, env, needle):
    path = write(tmp_path, text)
    result = run("--config", path, "--check-config", env=env, cwd=str(tmp_path))
    assert result.returncode == 2, result
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    if not env:
        assert path in result.stderr or "line" in result.stderr or "plugin" in needle


def test_missing_config_file_exits_2(tmp_path):
    result = run("--config", str(tmp_path / "nope.yaml"), cwd=str(tmp_path))
    assert result.returncode == 2
    assert "config file not found" in result.stderr


def test_check_config_prints_effective_configuration(tmp_path):
    path = write(tmp_path, "server:\n  port: 9123\n")
    result = run("--config", path, "--check-config", "--host", "0.0.0.0", cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["server"]["port"] == 9123
    assert printed["server"]["host"] == "0.0.0.0"
    assert printed["quotas"]["defaults"]["shell"] == {
        "daily": 500,
        "weekly": 3000,
        "monthly": 10000,
    }


def test_unwritable_database_directory_is_a_config_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run(
        "--port", "0", env={"QUOTASERVER_DATABASE_URL": f"sqlite:///{blocker}/sub/q.db"},
        cwd=str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 2, result
    assert "database.url" in result.stderr


def test_with_overrides_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="nope.key: unknown setting"):
        load_config(None, env={}).with_overrides(nope__key=1)


def test_every_setting_is_in_docs_configuration_md():
    with open(os.path.join(ROOT, "docs", "configuration.md")) as fh:
        text = fh.read()
    missing = [s.key for s in SETTINGS if f"`{s.key}`" not in text]
    assert not missing, f"undocumented settings: {missing}"


@pytest.mark.parametrize("word", ["test", "change-me", "password"])
def test_the_digest_of_a_well_known_placeholder_is_refused(word):
    digest = hashlib.sha256(word.encode()).hexdigest()
    tokens = [{"name": "ci", "role": "service", "sha256": digest.upper()}]
    with pytest.raises(ConfigError, match=rf"auth.tokens: \[0\].sha256: is the digest of '{word}'"):
        load_config(None, env={}, overrides={"auth.tokens": tokens})
    strong = hashlib.sha256(b"a-generated-token-0123456789abcdef").hexdigest()
    ok = load_config(None, env={}, overrides={"auth.tokens": [{**tokens[0], "sha256": strong}]})
    assert ok["auth.tokens"][0]["sha256"] == strong
