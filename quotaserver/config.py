"""Settings, declared once: name, type, default, help, bounds.

Values come from (lowest to highest precedence) the declared defaults, the YAML file,
environment variables ``QUOTASERVER_<SECTION>_<KEY>`` and command-line flags. Every
problem is a :class:`ConfigError` naming the key (and file); ``run.py`` turns it into a
one-line message and exit status 2.
"""

from __future__ import annotations

import copy
import hashlib
import ipaddress
import math
import os
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import yaml

from .text import hidden_character

PERIODS = ("hourly", "daily", "weekly", "monthly")
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
ENV_PREFIX = "QUOTASERVER_"


class ConfigError(Exception):
    """A configuration problem; the message names the offending key."""


@dataclass(frozen=True)
class Setting:
    key: str  # dotted path, e.g. "server.port"
    type: type | tuple[type, ...]
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None  # returns an error text or None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.replace(".", "_").upper()


def _check_timezone(value: str) -> str | None:
    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return f"unknown time zone {value!r}"
    return None


def _check_database_url(value: str) -> str | None:
    if not value.startswith(("sqlite:///", "postgres://", "postgresql://")):
        return "must start with sqlite:/// or postgresql://"
    return None


MIN_SECRET_BYTES = 32  # backplane.secret


def _check_backplane_url(value: str) -> str | None:
    if value and not value.startswith(("redis://", "rediss://", "unix://")):
        return "must be empty (in-process) or a redis://, rediss:// or unix:// URL"
    return None


def _check_limits(value: Any) -> str | None:
    if not isinstance(value, dict):
        return "must be a mapping of command type to limits"
    for cmd, limits in value.items():
        if not isinstance(cmd, str) or not cmd:
            return "command type names must be non-empty strings"
        if not isinstance(limits, dict):
            return f"{cmd}: must be a mapping of period to limit"
        for period, limit in limits.items():
            if period not in PERIODS:
                return f"{cmd}.{period}: unknown period (expected one of {', '.join(PERIODS)})"
            if limit is not None and (
                not isinstance(limit, int) or isinstance(limit, bool) or limit < 0
            ):
                return f"{cmd}.{period}: must be a non-negative integer or null (unlimited)"
    return None


def _check_bands(value: Any) -> str | None:
    if not isinstance(value, list) or not value:
        return "must be a non-empty list of [threshold_percent, factor] pairs"
    for band in value:
        if (
            not isinstance(band, list | tuple)
            or len(band) != 2
            or not all(isinstance(x, int | float) and not isinstance(x, bool) for x in band)
        ):
            return "each band must be [threshold_percent, factor]"
        threshold, factor = band
        if not 0 <= threshold <= 100 or not 0 <= factor <= 1:
            return "threshold must be within 0..100 and factor within 0..1"
    if len({band[0] for band in value}) != len(value):
        return "each threshold may appear once"
    return None


def _check_tokens(value: Any) -> str | None:
    if not isinstance(value, list):
        return "must be a list of {name, role, sha256 | env}"
    for i, tok in enumerate(value):
        if not isinstance(tok, dict):
            return f"[{i}]: must be a mapping"
        unknown = set(tok) - {"name", "role", "sha256", "env"}
        if unknown:
            return f"[{i}]: unknown key {sorted(unknown)[0]!r}"
        if not isinstance(tok.get("name"), str) or not tok["name"]:
            return f"[{i}].name: required"
        if tok.get("role") not in ("admin", "viewer", "service", "metrics"):
            return f"[{i}].role: must be admin, viewer, service or metrics"
        if ("sha256" in tok) == ("env" in tok):
            return f"[{i}]: give exactly one of sha256 or env"
        if "sha256" in tok and (
            not isinstance(tok["sha256"], str)
            or len(tok["sha256"]) != 64
            or any(c not in "0123456789abcdef" for c in tok["sha256"].lower())
        ):
            return f"[{i}].sha256: must be a hex SHA-256 digest"
        if "sha256" in tok and (weak := _placeholder_digests().get(tok["sha256"].lower())):
            return (
                f"[{i}].sha256: is the digest of {weak!r}, a well-known placeholder anyone "
                "could send: generate a token (openssl rand -hex 32) and use its digest"
            )
    return None


#: Strings that examples, tutorials and tests use for a token. Their digests work when
#: pasted (SHA-256("test") once stood in docs/security.md), so they are refused.
WELL_KNOWN_TOKENS = ("test", "password", "secret", "token", "admin", "example", "")


def _placeholder_digests() -> dict[str, str]:
    """SHA-256 hex digest -> the placeholder it is the digest of."""
    from .credentials import PLACEHOLDERS  # credentials imports this module

    return {
        hashlib.sha256(text.encode()).hexdigest(): text
        for text in (*WELL_KNOWN_TOKENS, *sorted(PLACEHOLDERS))
    }


def _check_str_list(value: Any) -> str | None:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        return "must be a list of non-empty strings"
    return None


def _check_names(value: Any) -> str | None:
    err = _check_str_list(value)
    if err:
        return err
    for name in value:
        hidden = hidden_character(name)
        if hidden:
            return f"{name!r} contains an invisible or bidirectional character {hidden}"
    return None


def _check_origins(value: Any) -> str | None:
    err = _check_str_list(value)
    if err:
        return err
    for origin in value:
        parts = urlsplit(origin)
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or parts.username is not None
        ):
            return f"{origin!r} is not an origin like https://quotas.example.com[:port]"
        try:
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            return f"{origin!r} has an invalid port"
    return None


def _check_periods(value: Any) -> str | None:
    err = _check_str_list(value)
    if err:
        return err
    if not value:
        return "must name at least one period"
    bad = [v for v in value if v not in PERIODS]
    return f"unknown period {bad[0]!r}" if bad else None


DEFAULT_LIMITS = {
    "shell": {"daily": 500, "weekly": 3000, "monthly": 10000},
    "code": {"daily": 300, "weekly": 1500, "monthly": 5000},
    "test": {"daily": 1000, "weekly": 5000, "monthly": 20000},
    "review": {"daily": 200, "weekly": 1000, "monthly": 3000},
    "refactor": {"daily": 200, "weekly": 1000, "monthly": 3000},
}

SETTINGS: tuple[Setting, ...] = (
    Setting("dev", bool, False, "Enable development endpoints (/api/ws/test-*); admin only."),
    Setting("demo", bool, False, "Simulate users issuing commands through the real quota API."),
    Setting("server.host", str, "127.0.0.1", "Address to listen on."),
    Setting("server.port", int, 8888, "TCP port to listen on.", min=0, max=65535),
    Setting("server.xheaders", bool, False, "Trust X-Forwarded-For/Proto from a reverse proxy."),
    Setting(
        "server.max_body_size", int, 65536, "Largest accepted request body (bytes).", 1024, 2**26
    ),
    Setting("server.shutdown_timeout", float, 10.0, "Seconds allowed for a clean stop.", 0.1, 300),
    Setting(
        "server.log_level",
        str,
        "info",
        "Log level (debug also logs every successful request and quota denial).",
        choices=("debug", "info", "warning"),
    ),
    Setting(
        "server.workers",
        int,
        1,
        "Processes serving one port (more than 1 needs backplane.url and a shared database).",
        1,
        256,
    ),
    Setting(
        "server.instance_name",
        str,
        "",
        "Name of this instance in health, host figures and logs (empty: hostname:port).",
    ),
    Setting(
        "backplane.url",
        str,
        "",
        "Fan-out between instances: empty for in-process, or redis://host:port/db.",
        check=_check_backplane_url,
    ),
    Setting(
        "backplane.secret",
        str,
        "",
        "Cluster secret (at least 32 bytes) that signs every backplane message "
        "(HMAC-SHA256); required with backplane.url. Set it through "
        "QUOTASERVER_BACKPLANE_SECRET rather than in the file.",
    ),
    Setting(
        "backplane.channel",
        str,
        "quotaserver:events",
        "Redis channel carrying committed events (one per deployment sharing a Redis).",
    ),
    Setting(
        "server.max_connections_per_ip",
        int,
        100,
        "Open TCP connections per client address; more are closed at accept. Behind a "
        "proxy every connection comes from the proxy: set it high there (and for load tests).",
        1,
        1_000_000,
    ),
    Setting(
        "server.header_timeout",
        float,
        15.0,
        "Seconds a new connection has to send a complete request head, and a request its "
        "body; slower clients are disconnected.",
        0.1,
        3600,
    ),
    Setting(
        "server.idle_timeout",
        float,
        60.0,
        "Seconds a keep-alive connection may wait for its next request.",
        0.1,
        86400,
    ),
    Setting(
        "server.public_origins",
        list,
        [],
        "Origins (scheme://host[:port]) the server answers to: their hosts are accepted in "
        "Host, they are accepted in Origin. Loopback hosts always are; when empty and auth is "
        "enabled, any Host is accepted.",
        check=_check_origins,
    ),
    Setting(
        "server.log_format",
        str,
        "text",
        "Log lines as text or as JSON objects (one per line), both with UTC timestamps.",
        choices=("text", "json"),
    ),
    Setting(
        "database.url",
        str,
        "sqlite:///data/quotaserver.db",
        "peewee database URL.",
        check=_check_database_url,
    ),
    Setting(
        "database.sqlite_synchronous",
        str,
        "full",
        "SQLite synchronous mode: full survives power loss, normal a process crash.",
        choices=("full", "normal"),
    ),
    Setting(
        "database.pool_size",
        int,
        4,
        "Database threads for writes (PostgreSQL), shared by the `server.workers` processes: "
        "each gets pool_size / workers (at least 1); reads get half as many (at least 2).",
        1,
        64,
    ),
    Setting(
        "database.connect_timeout",
        float,
        3.0,
        "Seconds to wait for a PostgreSQL connection before answering 503.",
        0.1,
        300,
    ),
    Setting(
        "database.statement_timeout",
        float,
        5.0,
        "Longest database call (s): PostgreSQL cancels the statement, and a caller waits no "
        "longer than 2 x connect_timeout + this + 1 s (12 s by default) before answering 503.",
        0.1,
        3600,
    ),
    Setting(
        "database.busy_timeout",
        float,
        2.0,
        "Seconds SQLite waits for a lock held by another process before answering 503.",
        0,
        300,
    ),
    Setting(
        "quotas.command_types",
        list,
        list(DEFAULT_LIMITS),
        "Known command types.",
        check=_check_names,
    ),
    Setting(
        "quotas.periods",
        list,
        ["daily", "weekly", "monthly"],
        "Tracked windows (hourly is optional).",
        check=_check_periods,
    ),
    Setting(
        "quotas.defaults",
        dict,
        DEFAULT_LIMITS,
        "Global default limits per command type and period (null or missing = unlimited). "
        "Seeded into the database; what they do afterwards is quotas.defaults_policy.",
        check=_check_limits,
    ),
    Setting(
        "quotas.defaults_policy",
        str,
        "seed",
        "seed: the database (dashboard, admin API) wins and each limit where this file "
        "differs is a warning at start and reload; enforce: this file wins, applied (audited "
        "as config) at every start and SIGHUP.",
        choices=("seed", "enforce"),
    ),
    Setting(
        "quotas.timezone", str, "UTC", "Time zone of window boundaries.", check=_check_timezone
    ),
    Setting("quotas.week_start", str, "monday", "First day of a weekly window.", choices=WEEKDAYS),
    Setting("quotas.max_count", int, 10000, "Largest count accepted in one request.", 1, 10**9),
    Setting("quotas.max_username_length", int, 64, "Longest accepted user name.", 1, 255),
    Setting(
        "quotas.idempotency_ttl",
        float,
        86400.0,
        "Seconds an Idempotency-Key's answer is kept for retries (and its consume refundable).",
        1,
        90 * 86400,
    ),
    Setting(
        "quotas.unknown_command_status",
        int,
        400,
        "HTTP status for an unknown command type.",
        choices=(400, 404, 422),
    ),
    Setting(
        "throttle.cpu_bands",
        list,
        [[95, 0.25], [90, 0.5], [80, 0.8]],
        "CPU % thresholds and the throttle factor at or above each. The default never "
        "goes below 0.25: only a band configured to 0 refuses consumes.",
        check=_check_bands,
    ),
    Setting(
        "throttle.memory_bands",
        list,
        [[95, 0.25], [90, 0.5], [85, 0.8]],
        "Memory % thresholds and the throttle factor at or above each (default floor 0.25, "
        "as for the CPU).",
        check=_check_bands,
    ),
    Setting(
        "throttle.source",
        str,
        "host",
        "Load that drives the throttle: host (whole machine), process (this server) or off.",
        choices=("host", "process", "off"),
    ),
    Setting(
        "throttle.hysteresis",
        float,
        5.0,
        "Percentage points below a band's threshold the load must fall to leave the band.",
        0,
        50,
    ),
    Setting(
        "throttle.hold_seconds",
        float,
        10.0,
        "Seconds a new throttle factor must be wanted by every sample before it applies.",
        0,
        3600,
    ),
    Setting("realtime.stats_interval", float, 5.0, "Seconds between stats broadcasts.", 0.05, 3600),
    Setting(
        "realtime.heartbeat_interval", float, 10.0, "Seconds between ping messages.", 0.05, 3600
    ),
    Setting(
        "realtime.client_timeout",
        float,
        30.0,
        "Drop a WebSocket peer that has not answered protocol pings for this long.",
        0.1,
        3600,
    ),
    Setting("realtime.max_connections", int, 1000, "Live clients per instance.", 1, 1_000_000),
    Setting("realtime.client_queue", int, 50, "Durable events pending per client before close.", 1),
    Setting(
        "realtime.client_queue_bytes",
        int,
        1_048_576,
        "Bytes pending per client before close.",
        1024,
    ),
    Setting("realtime.replay_limit", int, 1000, "Most events replayed on reconnect.", 1, 100_000),
    Setting(
        "realtime.ring_size", int, 2000, "Recent events kept in memory for replay.", 0, 1_000_000
    ),
    Setting("realtime.sse_retry_ms", int, 2000, "SSE reconnection hint.", 100, 600_000),
    Setting("auth.enabled", bool, True, "Require credentials (turn off only for experiments)."),
    Setting(
        "auth.tokens", list, [], "API tokens: {name, role, sha256 | env}.", check=_check_tokens
    ),
    Setting(
        "auth.token_file",
        str,
        "data/admin_token",
        "Where the first-run admin token is stored (mode 0600).",
    ),
    Setting("auth.session_lifetime", float, 43200.0, "Browser session lifetime (s).", 60, 2**31),
    Setting(
        "auth.allowed_origins",
        list,
        [],
        "Extra WebSocket/SSE origins allowed (the server's own origin always is).",
        check=_check_str_list,
    ),
    Setting("auth.cookie_secret", str, "", "Cookie signing secret; generated and stored if empty."),
    Setting(
        "auth.allow_disabled_on_network",
        bool,
        False,
        "Allow auth.enabled: false on a server.host that is not a loopback address "
        "(anyone who can reach it is an admin).",
    ),
    Setting(
        "auth.login_code_lifetime",
        float,
        300.0,
        "Seconds the one-time login link printed at start-up stays valid.",
        10,
        3600,
    ),
    Setting(
        "auth.sync_interval",
        float,
        1.0,
        "How often each process re-reads the credentials version from the database (s): "
        "the bound for a token, revocation or logout made elsewhere to hold here when no "
        "backplane nudge arrives.",
        0.1,
        60,
    ),
    Setting(
        "auth.failed_attempts_per_ip",
        int,
        30,
        "Failed authentications per client address per failed_window; beyond it every "
        "request from that address is answered 429 before its credentials are checked.",
        1,
        1_000_000,
    ),
    Setting("auth.failed_window", float, 60.0, "Window of failed_attempts_per_ip (s).", 1, 86400),
    Setting(
        "auth.connect_attempts_per_ip",
        int,
        60,
        "WebSocket/SSE handshakes per client address per connect_window (more: 429).",
        1,
        1_000_000,
    ),
    Setting(
        "auth.connect_window", float, 10.0, "Window of connect_attempts_per_ip (s).", 0.1, 3600
    ),
    Setting(
        "auth.max_connections_per_identity",
        int,
        50,
        "Live WebSocket + SSE connections per token or session identity (more: 429).",
        1,
        1_000_000,
    ),
    Setting(
        "auth.ws_message_rate",
        float,
        10.0,
        "Sustained client messages per second on one WebSocket (beyond the burst: 1008).",
        0.1,
        10_000,
    ),
    Setting("auth.ws_message_burst", int, 20, "Client messages allowed in a burst.", 1, 100_000),
    Setting(
        "retention.events_days",
        int,
        30,
        "Days durable events are kept for replay (0: forever); older cursors get pruned.",
        0,
        100_000,
    ),
    Setting(
        "retention.violations_days",
        int,
        90,
        "Days violations are kept (0: forever); the daily chart shows only what is kept.",
        0,
        100_000,
    ),
    Setting(
        "retention.activity_days",
        int,
        7,
        "Days of per-minute activity kept (0: forever); charts show at most 24 hours.",
        0,
        100_000,
    ),
    Setting("retention.interval", float, 3600.0, "Seconds between pruning runs.", 1, 86400),
    Setting(
        "retention.batch_size", int, 1000, "Rows deleted per transaction when pruning.", 1, 100_000
    ),
    Setting(
        "alerts.resolve_after",
        float,
        120.0,
        "Seconds a load or throttling condition must stay clear before its alert is "
        "resolved by the system (resolved_by: system); 0 resolves at the first clear check.",
        0,
        86400,
    ),
    Setting(
        "metrics.public",
        bool,
        False,
        "Serve /metrics without credentials (a scraper on a private network only).",
    ),
    Setting("plugins_dir", str, "", "Directory of extra plugin .py files (empty: none)."),
    Setting(
        "plugin_timeout",
        float,
        5.0,
        "Seconds one plugin hook implementation may take before it is abandoned as timed out.",
        0.01,
        3600,
    ),
    Setting(
        "plugin_max_payload_bytes",
        int,
        64 * 1024,
        "Largest event data, and largest set of stats fields, one plugin may publish (bytes "
        "of JSON): every event is stored and sent to every dashboard.",
        1024,
        16 * 1024 * 1024,
    ),
)
# QUOTASERVER_PLUGINS_<NAME>_<KEY>: resolved once the plugin names are known (plugins.py).
PLUGIN_ENV_PREFIX = ENV_PREFIX + "PLUGINS_"

BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}
BY_ENV: dict[str, Setting] = {s.env: s for s in SETTINGS}
SECTIONS = {s.key.split(".")[0] for s in SETTINGS if "." in s.key}


class Config(Mapping[str, Any]):
    """Validated, flat settings (``cfg["server.port"]``) plus per-plugin blocks."""

    def __init__(
        self,
        values: dict[str, Any],
        plugins: dict[str, dict],
        source: str | None,
        plugin_env: dict[str, str] | None = None,
    ):
        self._values = values
        self.plugins = plugins
        self.source = source
        #: QUOTASERVER_PLUGINS_* variables, applied by the plugin loader
        self.plugin_env = plugin_env or {}

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def plugin(self, name: str) -> dict:
        """Settings block of plugin ``name`` (empty if absent)."""
        return self.plugins.get(name, {})

    def plugin_enabled(self, name: str) -> bool:
        return self.plugin(name).get("enabled", True) is not False

    def with_overrides(self, **overrides: Any) -> Config:
        """A copy with some keys replaced (dots written as ``__``), validated."""
        values = dict(self._values)
        for name, value in overrides.items():
            key = name.replace("__", ".")
            if key not in BY_KEY:
                raise ConfigError(f"{key}: unknown setting")
            values[key] = _validate(BY_KEY[key], value, self.source)
        _check_combination(values, self.source)
        return Config(values, copy.deepcopy(self.plugins), self.source, dict(self.plugin_env))

    def as_nested(self) -> dict[str, Any]:
        """The effective configuration as YAML-shaped nested dicts (secrets redacted)."""
        out: dict[str, Any] = {}
        for key, value in self._values.items():
            if key in ("auth.cookie_secret", "backplane.secret") and value:
                value = "<redacted>"
            node = out
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        out["plugins"] = self.plugins
        return out


def is_loopback_host(host: str) -> bool:
    """True for localhost and loopback IP literals (127.0.0.0/8, ::1)."""
    host = host.strip().lower().strip("[]").rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _where(source: str | None) -> str:
    return f" (in {source})" if source else ""


def _validate(setting: Setting, value: Any, source: str | None) -> Any:
    where = _where(source)
    expected = setting.type
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, expected) and not (expected is not bool and isinstance(value, bool))
    if not ok:
        name = expected.__name__ if isinstance(expected, type) else "value"
        raise ConfigError(f"{setting.key}: expected {name}, got {value!r}{where}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{setting.key}: must be a finite number, got {value!r}{where}")
    if setting.min is not None and value < setting.min:
        raise ConfigError(f"{setting.key}: must be >= {setting.min}, got {value!r}{where}")
    if setting.max is not None and value > setting.max:
        raise ConfigError(f"{setting.key}: must be <= {setting.max}, got {value!r}{where}")
    if setting.choices is not None and value not in setting.choices:
        allowed = ", ".join(str(c) for c in setting.choices)
        raise ConfigError(f"{setting.key}: must be one of {allowed}, got {value!r}{where}")
    if setting.check is not None:
        err = setting.check(value)
        if err:
            raise ConfigError(f"{setting.key}: {err}{where}")
    return value


def _parse_env(setting: Setting, raw: str) -> Any:
    if setting.type is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{setting.key}: expected a boolean in {setting.env}, got {raw!r}")
    if setting.type in (int, float):
        try:
            return setting.type(raw)
        except ValueError:
            raise ConfigError(
                f"{setting.key}: expected {setting.type.__name__} in {setting.env}, got {raw!r}"
            ) from None
    if setting.type in (list, dict):
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"{setting.key}: {setting.env} is not valid YAML") from None
    return raw


def _flatten(data: dict, source: str | None) -> tuple[dict[str, Any], dict[str, dict]]:
    """The file's settings as ``{"section.key": value}`` plus its plugin blocks."""
    flat: dict[str, Any] = {}
    plugins: dict[str, dict] = {}
    where = _where(source)
    for top, value in data.items():
        if not isinstance(top, str):
            raise ConfigError(f"{top!r}: keys must be strings{where}")
        if top == "plugins":
            plugins.update(_plugin_blocks(value, where))
        elif top in SECTIONS:
            flat.update(_section(top, value, where))
        elif top in BY_KEY:
            flat[top] = value
        else:
            raise ConfigError(f"{top}: unknown setting{where}")
    return flat, plugins


def _plugin_blocks(value: Any, where: str) -> dict[str, dict]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"plugins: must be a mapping of plugin name to settings{where}")
    blocks: dict[str, dict] = {}
    for name, block in value.items():
        block = {} if block is None else block
        if not isinstance(block, dict):
            raise ConfigError(f"plugins.{name}: must be a mapping{where}")
        if "enabled" in block and not isinstance(block["enabled"], bool):
            raise ConfigError(f"plugins.{name}.enabled: expected bool{where}")
        blocks[str(name)] = dict(block)
    return blocks


def _section(top: str, value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{top}: must be a mapping{where}")
    flat: dict[str, Any] = {}
    for key, sub in value.items():
        full = f"{top}.{key}"
        if full not in BY_KEY:
            raise ConfigError(f"{full}: unknown setting{where}")
        flat[full] = sub
    return flat


def _read_file(path: str) -> tuple[dict[str, Any], dict[str, dict]]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"invalid YAML{at} (in {path})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping (in {path})")
    return _flatten(data or {}, path)


def _apply_env(values: dict[str, Any], env: Mapping[str, str]) -> dict[str, str]:
    """Apply ``QUOTASERVER_*`` variables to ``values``; returns the plugins' own variables."""
    plugin_env: dict[str, str] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == "QUOTASERVER_ADMIN_TOKEN":
            continue
        setting = BY_ENV.get(name)
        if setting is None and name.startswith(PLUGIN_ENV_PREFIX):
            plugin_env[name] = value
            continue
        if setting is None:
            raise ConfigError(f"{name}: unknown setting in the environment")
        values[setting.key] = _validate(setting, _parse_env(setting, value), name)
    return plugin_env


def load_config(
    path: str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the effective configuration; raises :class:`ConfigError` on any problem.

    Precedence, lowest first: the defaults, the file, the environment, the command line.
    """
    env = os.environ if env is None else env
    raw, plugins = _read_file(path) if path else ({}, {})
    values = {s.key: copy.deepcopy(s.default) for s in SETTINGS}
    for key, value in raw.items():
        values[key] = _validate(BY_KEY[key], value, path)
    plugin_env = _apply_env(values, env)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _validate(BY_KEY[key], value, "command line")
    _check_auth_exposure(values, path)
    unknown = set(values["quotas.defaults"]) - set(values["quotas.command_types"])
    if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(
            f"quotas.defaults.{name}: not listed in quotas.command_types{_where(path)}"
        )
    _check_combination(values, path)
    return Config(values, plugins, path, plugin_env)


def _check_auth_exposure(values: dict[str, Any], source: str | None) -> None:
    if (
        not values["auth.enabled"]
        and not values["auth.allow_disabled_on_network"]
        and not is_loopback_host(values["server.host"])
    ):
        raise ConfigError(
            f"auth.enabled: false is refused on server.host {values['server.host']} (not a "
            "loopback address: anyone who can reach it would be an admin); set "
            f"auth.allow_disabled_on_network: true to accept that{_where(source)}"
        )


def _check_combination(values: dict[str, Any], source: str | None) -> None:
    """Settings that are valid alone but not together."""
    secret = values["backplane.secret"]
    if secret and len(secret.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"backplane.secret: must be at least {MIN_SECRET_BYTES} bytes "
            f"(e.g. python3 -c 'import secrets; print(secrets.token_hex(32))'){_where(source)}"
        )
    # Several workers of one machine may share a secret their parent generates.
    if values["backplane.url"] and not secret and values["server.workers"] == 1:
        raise ConfigError(
            "backplane.secret: required with backplane.url (every instance signs what it "
            "publishes with it); set QUOTASERVER_BACKPLANE_SECRET to the same value of at "
            f"least {MIN_SECRET_BYTES} bytes on every instance{_where(source)}"
        )
    if values["server.workers"] > 1 and not values["backplane.url"]:
        raise ConfigError(
            "server.workers: more than one worker needs backplane.url (a Redis URL) so that "
            f"every worker's clients see every event{_where(source)}"
        )


def positive_number(value: Any) -> str | None:
    """A check for plugin settings: a number greater than zero."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return f"must be a positive number, got {value!r}"
    return None


def check_plugin_block(
    name: str, block: dict[str, Any], fields: dict[str, Callable[[Any], str | None]]
) -> list[str]:
    """Errors in plugin ``name``'s settings: unknown keys, and each field's own check.

    For ``validate_config`` implementations; ``enabled`` is always allowed.
    """
    errors = []
    for key, value in block.items():
        if key == "enabled":
            continue
        check = fields.get(key)
        if check is None:
            errors.append(f"plugins.{name}.{key}: unknown setting")
        elif (problem := check(value)) is not None:
            errors.append(f"plugins.{name}.{key}: {problem}")
    return errors
