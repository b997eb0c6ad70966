"""check-config redacts every secret and fails exactly as start-up would (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from plugin_files import plugin_dir
from services import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRONG = "a-strong-admin-token-0123456789abcdef"


def run(tmp_path, command: str, config: dict | None = None, *extra: str, **env: str):
    args = [sys.executable, "-m", "quotaserver", command, "--port", "0", *extra]
    if config is not None:
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        args += ["--config", str(path)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QUOTASERVER_")}
    clean["PYTHONPATH"] = ROOT
    return subprocess.run(
        args, cwd=tmp_path, env={**clean, **env}, capture_output=True, text=True, timeout=60
    )


def test_every_secret_is_redacted(tmp_path):
    config = {
        "database": {"url": "postgresql://qs:s3cret-pw@db.example:5432/qs?password=q-pw"},
        "backplane": {
            "url": "rediss://:redis-pw@redis.example:6380/0",
            "secret": "backplane-secret-value-0123456789abcdef",
        },
        "auth": {
            "cookie_secret": "cookie-secret-value-0123456789",
            "tokens": [
                {"name": "ci", "role": "service", "sha256": "ab" * 32},
                {"name": "ops", "role": "admin", "env": "OPS_TOKEN"},
            ],
        },
        "plugins": {"disk_usage": {"path": "/", "api_key": "plugin-key-value"}},
    }
    result = run(tmp_path, "check-config", config, OPS_TOKEN=STRONG, QUOTASERVER_ADMIN_TOKEN=STRONG)
    assert result.returncode == 0, result.stderr
    secrets = (
        "s3cret-pw",
        "q-pw",
        "redis-pw",
        "cookie-secret-value",
        "ab" * 32,
        "plugin-key-value",
        "backplane-secret-value",
    )
    for secret in secrets:
        assert secret not in result.stdout, secret
    assert STRONG not in result.stdout
    shown = yaml.safe_load(result.stdout)
    assert shown["database"]["url"].startswith("postgresql://qs:")
    assert "@db.example:5432/qs" in shown["database"]["url"]
    assert shown["auth"]["tokens"][1] == {"name": "ops", "role": "admin", "env": "OPS_TOKEN"}
    assert shown["plugins"]["disk_usage"]["path"] == "/"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({}, "OPS_TOKEN (token 'ops') is not set"),
        ({"OPS_TOKEN": "short-token"}, "shorter than 16 characters"),
        ({"OPS_TOKEN": STRONG, "QUOTASERVER_ADMIN_TOKEN": "change-me"}, "placeholder"),
        ({"OPS_TOKEN": STRONG, "QUOTASERVER_ADMIN_TOKEN": "0123456789"}, "shorter than 16"),
        (
            {"OPS_TOKEN": "replace-with-output-of-openssl-rand-hex-32"},
            "placeholder",
        ),
    ],
)
@pytest.mark.parametrize("enabled", [True, False])
def test_check_config_fails_exactly_as_start_up_does(tmp_path, env, needle, enabled):
    tokens = [{"name": "ops", "role": "admin", "env": "OPS_TOKEN"}]
    config = {"auth": {"enabled": enabled, "tokens": tokens}}
    checked = run(tmp_path, "check-config", config, **env)
    served = run(tmp_path, "serve", config, **env)
    for result in (checked, served):
        assert result.returncode == 2, result
        assert needle in result.stderr
        assert "Traceback" not in result.stderr
    assert checked.stderr == served.stderr
    # Nothing was started: no database, no token file.
    assert not (tmp_path / "data").exists()


def test_connect_exits_2_naming_an_unreachable_database_and_redis(tmp_path):
    closed = free_port()  # nothing listens there: connections are refused at once
    config = {
        "database": {"url": f"postgresql://qs@127.0.0.1:{closed}/qs", "connect_timeout": 1.0},
        "backplane": {"url": f"redis://127.0.0.1:{closed}/0"},
        "server": {"workers": 2},
    }
    plain = run(tmp_path, "check-config", config)
    assert plain.returncode == 0, plain.stderr  # without --connect only the file is checked
    checked = run(tmp_path, "check-config", config, "--connect")
    assert checked.returncode == 2, checked
    problems = [line for line in checked.stderr.splitlines() if "--connect" in line]
    assert len(problems) == 2, checked.stderr
    assert "database.url: cannot use the database" in problems[0]
    assert "backplane.url: cannot reach Redis" in problems[1]
    assert "Traceback" not in checked.stderr
    assert not (tmp_path / "data").exists()  # nothing was created


def test_urls_print_as_configured_and_secrets_show_only_their_presence(tmp_path):
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "notifier.py").write_text(
        "from quotaserver import hookimpl\n\n"
        "@hookimpl\n"
        "def secret_settings():\n"
        "    return ['webhook_url', 'auth_header']\n"
    )
    config = {
        "plugins_dir": str(plugin_dir),
        "plugins": {
            "notifier": {
                "webhook_url": "https://hooks.example/T000/B000/xyzzy-hook-secret",
                "auth_header": "Basic aGVhZGVyLXNlY3JldA==",
                "dsn": "postgresql://app:dsn-secret-pw@db.example/app",
                "channel": "#quotas",
            }
        },
    }
    result = run(tmp_path, "check-config", config, QUOTASERVER_ADMIN_TOKEN=STRONG)
    assert result.returncode == 0, result.stderr
    for secret in ("xyzzy-hook-secret", "aGVhZGVyLXNlY3JldA", "dsn-secret-pw", STRONG):
        assert secret not in result.stdout, secret
    shown = yaml.safe_load(result.stdout)
    block = shown["plugins"]["notifier"]
    assert block["webhook_url"] == block["auth_header"] == "<redacted>"
    assert block["dsn"] == "postgresql://app:<redacted>@db.example/app"
    assert block["channel"] == "#quotas"
    assert shown["database"]["url"] == "sqlite:///data/quotaserver.db"  # was sqlite:/data/...
    assert "#   QUOTASERVER_ADMIN_TOKEN: set (an admin token from the environment" in result.stdout


def test_check_config_refuses_a_stats_field_clash_as_serve_does(tmp_path):
    """Two plugins' stats_fields claim one field: serve stops with exit 2 naming both, and
    check-config, which starts nothing, says the same."""
    claim = (
        "from quotaserver import hookimpl\n\n"
        "@hookimpl\n"
        "def stats_fields(app):\n"
        "    return {'queue_depth': 1}\n"
    )
    directory = plugin_dir(tmp_path, first_queue=claim, second_queue=claim)
    config = {"plugins_dir": directory}
    checked = run(tmp_path, "check-config", config)
    served = run(tmp_path, "serve", config)
    needle = "stats field 'queue_depth' is claimed by plugins first_queue and second_queue"
    for result in (checked, served):
        assert result.returncode == 2, result
        assert needle in result.stderr
        assert "Traceback" not in result.stderr


def test_a_stats_field_that_is_not_json_is_refused_by_check_config_and_serve(tmp_path):
    when = (
        "import datetime\n"
        "from quotaserver import hookimpl\n\n"
        "@hookimpl\n"
        "def stats_fields(app):\n"
        "    return {'last_run': datetime.datetime(2026, 1, 1)}\n"
    )
    config = {"plugins_dir": plugin_dir(tmp_path, last_run=when)}
    checked = run(tmp_path, "check-config", config)
    served = run(tmp_path, "serve", config)
    needle = "plugin last_run: stats_fields returned a value that is not JSON"
    for result in (checked, served):
        assert result.returncode == 2, result
        assert needle in result.stderr and "datetime" in result.stderr
        assert "Traceback" not in result.stderr
