"""auth is split by concern: env tokens are checked in one place (credentials.env_tokens),
and log redaction is installed by the entry point, not as a side effect of building Auth."""

import re
import subprocess
import sys
import textwrap

import pytest
from conftest import make_config

from quotaserver.auth import Auth
from quotaserver.config import ConfigError
from quotaserver.credentials import check_tokens, env_tokens

ENV_TOKEN = [{"name": "ci", "role": "viewer", "env": "CI_TOKEN"}]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "environment variable CI_TOKEN (token 'ci') is not set"),
        ({"CI_TOKEN": "short"}, "CI_TOKEN (token 'ci') is shorter than 16 characters"),
        ({"CI_TOKEN": "x" * 20, "QUOTASERVER_ADMIN_TOKEN": "change-me"}, "placeholder"),
    ],
)
def test_start_up_and_check_config_refuse_the_same_env_tokens(tmp_path, env, message):
    config = make_config(tmp_path, auth__tokens=ENV_TOKEN)
    for check in (lambda: check_tokens(config, env), lambda: Auth(config, env)):
        with pytest.raises(ConfigError, match=re.escape(message)):
            check()


def test_env_tokens_are_registered_from_the_one_reader(tmp_path):
    config = make_config(tmp_path, auth__tokens=ENV_TOKEN)
    env = {"CI_TOKEN": "c" * 20, "QUOTASERVER_ADMIN_TOKEN": "a" * 20}
    assert env_tokens(config, env) == [("c" * 20, "ci", "viewer"), ("a" * 20, "env-admin", "admin")]
    auth = Auth(config, env)
    assert auth.authenticate("c" * 20).role == "viewer"
    assert auth.authenticate("a" * 20).name == "env-admin"


def test_log_redaction_is_installed_by_the_entry_point(tmp_path):
    script = textwrap.dedent(
        f"""
        import logging
        from quotaserver import cli
        from quotaserver.auth import Auth
        from quotaserver.config import load_config
        from quotaserver.redaction import RedactSecrets

        def installed():
            return any(isinstance(f, RedactSecrets)
                       for f in logging.getLogger("tornado.access").filters)

        config = load_config(env={{}}).with_overrides(auth__token_file="{tmp_path}/t")
        Auth(config, {{}})
        print(installed())
        cli.load(cli.parse_args(["check-config"]))
        print(installed())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"]
