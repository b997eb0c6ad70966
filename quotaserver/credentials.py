"""Secrets in the configuration: refuse weak tokens at start-up, redact secrets for display.

Both ``serve`` and ``check-config`` run :func:`check_tokens`, so a configuration that
check-config accepts is one that starts.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .config import Config, ConfigError

REDACTED = "<redacted>"
MIN_TOKEN_LENGTH = 16
#: Values that documentation and examples use where a real token belongs. A token equal to
#: one of them (case-insensitive) is refused: it was copied, not generated.
PLACEHOLDERS = frozenset(
    {"change-me", "changeme", "replace-me", "replace-with-output-of-openssl-rand-hex-32"}
)
#: Plugin settings whose name says they hold a secret.
SECRET_KEY = re.compile(r"pass(word)?|secret|token|api_?key|credential", re.IGNORECASE)


def token_problem(value: str) -> str | None:
    """Why ``value`` is not acceptable as a token, or None."""
    if value.strip().lower() in PLACEHOLDERS:
        return "is a documented placeholder: generate one (openssl rand -hex 32)"
    if len(value) < MIN_TOKEN_LENGTH:
        return f"is shorter than {MIN_TOKEN_LENGTH} characters"
    return None


def env_tokens(config: Config, env: Mapping[str, str]) -> list[tuple[str, str, str]]:
    """``(token, name, role)`` of every token given through the environment (the
    ``env`` entries of ``auth.tokens``, then ``QUOTASERVER_ADMIN_TOKEN`` as ``env-admin``).

    The one check of those tokens, for start-up (``auth.Auth``) and check-config alike:
    :class:`ConfigError` for one that is unset or weak.
    """
    found = []
    admin = env.get("QUOTASERVER_ADMIN_TOKEN")
    if admin is not None:
        problem = token_problem(admin)
        if problem:
            raise ConfigError(f"QUOTASERVER_ADMIN_TOKEN {problem}")
    for i, entry in enumerate(config["auth.tokens"]):
        if "env" not in entry:
            continue
        value = env.get(entry["env"])
        if not value:
            raise ConfigError(
                f"auth.tokens: environment variable {entry['env']} "
                f"(token {entry['name']!r}) is not set"
            )
        problem = token_problem(value)
        if problem:
            raise ConfigError(
                f"auth.tokens[{i}]: {entry['env']} (token {entry['name']!r}) {problem}"
            )
        found.append((value, entry["name"], entry["role"]))
    if admin is not None:
        found.append((admin, "env-admin", "admin"))
    return found


def check_tokens(config: Config, env: Mapping[str, str]) -> None:
    """Raise :class:`ConfigError` for an unset or weak token given through the environment,
    before anything starts (the same check as start-up: :func:`env_tokens`)."""
    env_tokens(config, env)


def redact_url(url: str) -> str:
    """A database URL with its password (in the authority or the query) replaced."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{REDACTED}@{host}"
    query = parts.query
    if query:
        pairs = [
            (k, REDACTED if SECRET_KEY.search(k) else v)
            for k, v in parse_qsl(query, keep_blank_values=True)
        ]
        query = urlencode(pairs, safe="<>")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _redact_block(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: REDACTED if isinstance(k, str) and SECRET_KEY.search(k) and v else _redact_block(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redact_block(v) for v in value]
    return value


def redacted(config: Config) -> dict[str, Any]:
    """The effective configuration, nested as in YAML, safe to print."""
    out = config.as_nested()
    out["database"]["url"] = redact_url(config["database.url"])
    out["backplane"]["url"] = redact_url(config["backplane.url"])  # redis://:password@...
    if config["auth.cookie_secret"]:
        out["auth"]["cookie_secret"] = REDACTED
    if config["backplane.secret"]:
        out["backplane"]["secret"] = REDACTED
    out["auth"]["tokens"] = [
        {**t, "sha256": REDACTED} if "sha256" in t else dict(t) for t in config["auth.tokens"]
    ]
    out["plugins"] = _redact_block(config.plugins)
    return out
