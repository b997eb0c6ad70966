"""check-config redacts every secret and fails exactly as start-up would (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRONG = "a-strong-admin-token-0123456789abcdef"


def run(tmp_path, command: str, config: dict | None = None, **env: str):
    args = [sys.executable, "-m", "quotaserver", command, "--port", "0"]
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
