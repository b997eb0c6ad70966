"""The systemd unit and environment file in deploy/ are what the issue and the runbook say."""

from __future__ import annotations

import configparser
import os
import secrets
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "deploy")


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read(os.path.join(DEPLOY, "quotaserver.service"))
    return parser


def env_file() -> dict[str, str]:
    values = {}
    with open(os.path.join(DEPLOY, "quotaserver.env")) as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                values[key] = value
    return values


def test_the_unit_runs_unprivileged_with_a_private_environment_file_and_restarts():
    service = unit()["Service"]
    assert service["User"] not in ("", "root")
    assert service["EnvironmentFile"] == "/etc/quotaserver/quotaserver.env"
    assert service["Restart"] == "on-failure" and float(service["RestartSec"]) > 0
    assert service["RestartPreventExitStatus"] == "2"  # a configuration error stays down
    assert "quotaserver serve" in service["ExecStart"]
    assert "Environment" not in service  # no secret inline in a world-readable unit
    assert unit()["Install"]["WantedBy"] == "multi-user.target"
    with open(os.path.join(DEPLOY, "quotaserver.service")) as fh:
        assert "install -m 0600" in fh.read()  # the documented mode of the environment file


def check_config(tmp_path, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("QUOTASERVER_")}
    return subprocess.run(
        [sys.executable, "-m", "quotaserver", "check-config"],
        cwd=tmp_path, env={**clean, **env, "PYTHONPATH": ROOT},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_the_example_environment_file_is_refused_until_a_token_is_generated(tmp_path):
    example = env_file()
    result = check_config(tmp_path, example)
    assert result.returncode == 2
    assert "QUOTASERVER_ADMIN_TOKEN is a documented placeholder" in result.stderr
    generated = {**example, "QUOTASERVER_ADMIN_TOKEN": secrets.token_hex(32)}
    assert check_config(tmp_path, generated).returncode == 0
