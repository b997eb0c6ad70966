"""What ``check-config`` prints: the configuration with every secret redacted, which secrets
are present (never their values), and the limits actually in force.

An operator reads this to know what ``serve`` will do; it must be right (a SQLite URL
printed as ``sqlite:/data/...`` is not the one configured) and safe to paste into a ticket
(no webhook URL, DSN password or header a plugin was given).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from .credentials import REDACTED, SECRET_KEY, redact_url, redacted
from .defaults_policy import compare

if TYPE_CHECKING:
    from .config import Config


def _has_secret(url: str) -> bool:
    """A URL with a password, or a query parameter named like a secret."""
    try:
        parts = urlsplit(url)
        return parts.password is not None or any(
            SECRET_KEY.search(k) for k, _ in parse_qsl(parts.query)
        )
    except ValueError:
        return False


def _redact_urls(value: Any) -> Any:
    """Every URL-shaped string with a password in it (a DSN in a plugin's block), redacted."""
    if isinstance(value, dict):
        return {k: _redact_urls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_urls(v) for v in value]
    if isinstance(value, str) and "://" in value and _has_secret(value):
        return redact_url(value)
    return value


def display_config(config: Config, plugin_secrets: Mapping[str, frozenset[str]]) -> dict:
    """The effective configuration, nested as in YAML, safe to print."""
    out = redacted(config)
    for section in ("database", "backplane"):
        url = config[f"{section}.url"]
        if not _has_secret(url):
            out[section]["url"] = url  # as configured (redaction would re-assemble it)
    plugins = out["plugins"]
    for name, keys in plugin_secrets.items():
        block = plugins.get(name)
        if isinstance(block, dict):
            for key in keys & set(block):
                if block[key] not in (None, ""):
                    block[key] = REDACTED
    out["plugins"] = _redact_urls(plugins)
    return out


def secret_presence(config: Config, env: Mapping[str, str]) -> list[str]:
    """One line per secret the server will use: whether it is there, and from where."""
    lines = []
    if env.get("QUOTASERVER_ADMIN_TOKEN"):
        lines.append(
            "QUOTASERVER_ADMIN_TOKEN: set (an admin token from the environment: sign in by "
            "pasting it at /login; no sign-in link is printed for it)"
        )
    else:
        lines.append("QUOTASERVER_ADMIN_TOKEN: not set")
    for entry in config["auth.tokens"]:
        what = f"auth.tokens {entry['name']} ({entry['role']})"
        if "env" in entry:
            state = "set" if env.get(entry["env"]) else "NOT SET"
            lines.append(f"{what}: {entry['env']} {state}")
        else:
            lines.append(f"{what}: SHA-256 digest in the file")
    if config["auth.cookie_secret"]:
        lines.append("auth.cookie_secret: in the configuration")
    else:
        path = os.path.join(os.path.dirname(config["auth.token_file"]) or ".", "cookie_secret")
        state = "present" if os.path.exists(path) else "created at the first start"
        lines.append(f"auth.cookie_secret: from {path} ({state})")
    if config["backplane.url"]:
        lines.append(
            "backplane.secret: set"
            if config["backplane.secret"]
            else "backplane.secret: not set (--workers generates one for its workers only)"
        )
    token_file = config["auth.token_file"]
    state = "present" if os.path.exists(token_file) else "absent (created at a first start)"
    lines.append(f"auth.token_file {token_file}: {state}")
    for section in ("database", "backplane"):
        url = config[f"{section}.url"]
        if url:
            has = _has_secret(url)
            lines.append(f"{section}.url: {'password present' if has else 'no password'}")
    return lines


def limits_lines(config: Config, limits: dict[tuple[str, str], int | None]) -> list[str]:
    """The global limits in force, per command type, each noting where the file differs."""
    periods = config["quotas.periods"]
    differing = {
        (d.command_type, d.period): d for d in compare(config["quotas.defaults"], limits, periods)
    }
    lines = []
    for command_type in sorted({c for c, _ in limits} | set(config["quotas.defaults"])):
        parts = []
        for period in periods:
            limit = limits.get((command_type, period))
            text = f"{period} {'unlimited' if limit is None else limit}"
            diff = differing.get((command_type, period))
            if diff is not None:
                said = "unlimited" if diff.configured is None else diff.configured
                text += f" (the file says {said})"
            parts.append(text)
        lines.append(f"{command_type}: {', '.join(parts)}")
    if differing:
        policy = config["quotas.defaults_policy"]
        effect = "applied at the next start" if policy == "enforce" else "not enforced"
        lines.append(f"quotas.defaults_policy: {policy}: the file's differing limits are {effect}")
    return lines
