"""Alert engine: rules from the configuration turn violations, utilisation and load into alerts.

Rules (``plugins.alert_engine.rules.<name>``; each may set ``enabled``, ``severity`` and its
threshold):

- ``quota_violation``: a user with >= ``threshold`` (5) violations today -> critical.
- ``high_utilization``: a user at >= ``threshold`` (0.8) of a daily limit -> high.
- ``approaching_limit``: >= ``threshold`` (0.9) of a daily limit -> high, before the violation.
- ``sustained_throttling``: factor < ``threshold`` (0.5) for ``duration`` (300) s -> high.
- ``high_system_load``: CPU or memory >= ``threshold`` (85) % -> critical.

Alerts end by themselves (``resolved_by: "system"``, through ``app.alerts.end``) when
their condition has cleared; a recurrence then opens a new alert:

- the daily rules (``quota_violation``, ``high_utilization``, ``approaching_limit``): at a
  new day; the utilisation rules also as soon as the user is below the threshold again
  (a limit raised above the usage, or the usage reset);
- ``sustained_throttling`` and ``high_system_load``: once the factor or the load has been
  clear for ``alerts.resolve_after`` seconds (a short dip back does not end the episode).

Storage, deduplication (one live alert per rule, user and day; a repeat raises ``count``),
acknowledge and resolve belong to ``app.alerts``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable
from typing import Any

from quotaserver import (
    SEVERITIES,
    PeriodicEmitter,
    check_plugin_block,
    hookimpl,
    positive_number,
    readings,
)

NAME = "alert_engine"
DEFAULT_RULES: dict[str, dict[str, Any]] = {
    "quota_violation": {"threshold": 5, "severity": "critical"},
    "high_utilization": {"threshold": 0.8, "severity": "high"},
    "approaching_limit": {"threshold": 0.9, "severity": "high"},
    "sustained_throttling": {"threshold": 0.5, "duration": 300, "severity": "high"},
    "high_system_load": {"threshold": 85, "severity": "critical"},
}
DAILY_RULES = ("quota_violation", "high_utilization", "approaching_limit")
UTILIZATION_RULES = ("high_utilization", "approaching_limit")


def _check_rules(rules: Any) -> str | None:
    if rules is None:
        return None
    if not isinstance(rules, dict):
        return "must be a mapping of rule name to settings"
    for name, rule in rules.items():
        if name not in DEFAULT_RULES:
            return f"unknown rule {name!r} (expected one of {', '.join(DEFAULT_RULES)})"
        if rule is None:
            continue
        if not isinstance(rule, dict):
            return f"{name}: must be a mapping"
        for field, value in rule.items():
            error = _rule_field_error(name, field, value)
            if error:
                return error
    return None


def _rule_field_error(name: str, field: str, value: Any) -> str | None:
    if field == "enabled":
        ok = isinstance(value, bool)
    elif field == "severity":
        ok = value in SEVERITIES
    elif field == "duration":  # 0: raise as soon as the factor is low
        ok = positive_number(value) is None or value == 0
    elif field in DEFAULT_RULES[name]:
        ok = positive_number(value) is None
    else:
        return f"{name}.{field}: unknown setting"
    return None if ok else f"{name}.{field}: invalid value {value!r}"


@hookimpl
def validate_config(config: Any) -> list[str]:
    fields = {"rules": _check_rules, "check_interval": positive_number}
    return check_plugin_block(NAME, config.plugin(NAME), fields)


class Engine:
    def __init__(self, settings: dict[str, Any]):
        configured = settings.get("rules") or {}
        self.rules = {
            name: {**default, **(configured.get(name) or {})}
            for name, default in DEFAULT_RULES.items()
        }
        self.check_interval = float(settings.get("check_interval", 10.0))
        self.day_key: int | None = None
        self.violations: Counter[int] = Counter()
        self.throttled_since: float | None = None
        self.throttle_alerted = False
        self.load_alerted = False
        # Since when the condition of an alerted episode has been clear (None: not clear).
        self.throttle_clear_since: float | None = None
        self.load_clear_since: float | None = None

    def rule(self, name: str) -> dict[str, Any] | None:
        rule = self.rules[name]
        return rule if rule.get("enabled", True) else None


def _engine(app: Any) -> Engine:
    state = app.plugin_state(NAME)
    if "engine" not in state:
        state["engine"] = Engine(app.plugin_config(NAME))
    return state["engine"]


def _day(app: Any) -> tuple[int, str]:
    window = app.quota.calendar.window("daily", app.clock())
    return window.key, window.start.astimezone(app.quota.calendar.tz).date().isoformat()


def _day_start(app: Any) -> Any:
    return app.quota.calendar.window("daily", app.clock()).start


async def _cleared_users(app: Any, rule: str, threshold: float, day_key: int) -> list[int]:
    """Users with a live ``rule`` alert whose highest daily utilisation today is below
    ``threshold`` (a fraction): a raised limit or a reset usage ended their condition."""
    users = await readings.users_with_live_alert(app, rule)
    peaks = await readings.daily_peaks(app, sorted(users), day_key)
    return sorted(u for u in users if peaks.get(u, 0.0) < threshold * 100)


async def _new_day(app: Any, day: str) -> None:
    """Yesterday's counts are over: end the daily rules' alerts of earlier days."""
    for name in DAILY_RULES:
        await app.alerts.end(name, unless_day=day)


@hookimpl
def config_reloaded(app: Any, config: Any) -> None:
    """New rules (thresholds, severities, enabled) apply at once; the episodes in progress
    (today's counts, a throttling spell) are kept, so nothing alerts twice for a reload."""
    block = {k: v for k, v in config.plugin(NAME).items() if k != "enabled"}
    _engine(app).rules = Engine(block).rules


@hookimpl
def startup(app: Any) -> Any:
    engine = _engine(app)

    async def load() -> None:
        engine.violations = await readings.violations_per_user(app, _day_start(app))
        day_key, day = _day(app)
        engine.day_key = day_key
        live = await readings.live_alert_rules(app)
        engine.throttle_alerted = "sustained_throttling" in live
        engine.load_alerted = "high_system_load" in live
        if live & set(DAILY_RULES):
            await _new_day(app, day)

    return load()


@hookimpl
def on_event(app: Any, message: Any) -> Awaitable[Any] | None:
    # A limit or a usage reset may have brought users back below a utilisation threshold.
    if message.type != "quota_change":
        return None
    return _end_cleared_utilization(app)


async def _end_cleared_utilization(app: Any) -> None:
    engine = _engine(app)
    day_key, _ = _day(app)
    for name in UTILIZATION_RULES:
        threshold = engine.rules[name]["threshold"]
        for user_id in await _cleared_users(app, name, threshold, day_key):
            await app.alerts.end(name, user_id=user_id)


@hookimpl
async def on_violation(app: Any, violation: dict[str, Any]) -> None:
    engine = _engine(app)
    rule = engine.rule("quota_violation")
    day_key, day = _day(app)
    if day_key != engine.day_key:
        engine.day_key, engine.violations = day_key, Counter()
        await _new_day(app, day)
    user_id = violation["user_id"]
    engine.violations[user_id] += 1
    count = engine.violations[user_id]
    if app.clustered:  # other instances record violations too: count them all
        count = await readings.user_violations(app, user_id, _day_start(app))
    if rule is None or count < rule["threshold"]:
        return
    label = "Critical" if rule["severity"] == "critical" else rule["severity"].capitalize()
    await app.alerts.raise_alert(
        "quota_violation",
        rule["severity"],
        f"{label}: {count} quota violations today",
        user_id=user_id,
        action="Review this user's activity; raise the limit or contact the user",
        dedupe_day=day,
    )


@hookimpl
def on_decision(app: Any, decision: Any) -> Awaitable[Any] | None:
    # A plain function that returns the alert's coroutine only on a crossing: the hook
    # runs on every consume, and an async one would cost a task each time.
    daily = decision.periods.get("daily")
    if not decision.consumed or daily is None or not daily.limit:
        return None
    engine = _engine(app)
    before = (daily.used - decision.count) / daily.limit
    after = daily.used / daily.limit
    # Only a crossing raises (or repeats) an alert, not every command above the line.
    for name, action in (
        ("approaching_limit", "The user will be refused soon; consider raising the limit"),
        ("high_utilization", "Watch this user's usage"),
    ):
        rule = engine.rule(name)
        if rule is None or not before < rule["threshold"] <= after:
            continue
        percent = round(after * 100)
        _, day = _day(app)  # only here: a calendar lookup per decision cost 3% of consume
        # approaching_limit implies high_utilization: one alert per crossing
        return app.alerts.raise_alert(
            name,
            rule["severity"],
            f"{decision.user} at {percent}% of the daily {decision.command_type} limit "
            f"({daily.used}/{daily.limit})",
            user_id=decision.user_id,
            action=action,
            dedupe_day=day,
        )
    return None


@hookimpl
def register_emitters(app: Any) -> list[PeriodicEmitter]:
    engine = _engine(app)

    async def check_load() -> None:
        now = app.clock().timestamp()
        load = app.load.current
        day_key, day = _day(app)
        if day_key != engine.day_key:
            engine.day_key, engine.violations = day_key, Counter()
            await _new_day(app, day)
        if not load.sampled_at:
            return  # nothing measured yet
        throttling = engine.rule("sustained_throttling")
        if throttling is not None:
            await _check_throttling(app, engine, throttling, load, now, day)
        high = engine.rule("high_system_load")
        if high is not None:
            await _check_high_load(app, engine, high, load, now, day)

    return [PeriodicEmitter("alert_rules", engine.check_interval, check_load)]


async def _check_throttling(
    app: Any, engine: Engine, rule: dict[str, Any], load: Any, now: float, day: str
) -> None:
    """Raise once the factor stayed below the threshold for the duration; end the alert
    once it has been clear for alerts.resolve_after."""
    if load.factor < rule["threshold"]:
        engine.throttled_since = engine.throttled_since or now
        engine.throttle_clear_since = None
        lasted = now - engine.throttled_since
        if lasted >= rule["duration"] and not engine.throttle_alerted:
            engine.throttle_alerted = True
            await app.alerts.raise_alert(
                "sustained_throttling",
                rule["severity"],
                f"Throttle factor below {rule['threshold']} for "
                f"{int(lasted)} s (now {load.factor})",
                action="Add capacity or find the source of the load",
                dedupe_day=day,
            )
        return
    engine.throttled_since = None
    if engine.throttle_alerted:
        engine.throttle_clear_since = engine.throttle_clear_since or now
        if now - engine.throttle_clear_since >= app.config["alerts.resolve_after"]:
            await app.alerts.end("sustained_throttling")
            engine.throttle_alerted, engine.throttle_clear_since = False, None


async def _check_high_load(
    app: Any, engine: Engine, rule: dict[str, Any], load: Any, now: float, day: str
) -> None:
    """Raise at once when CPU or memory reaches the threshold; end as for throttling."""
    if max(load.cpu_percent, load.memory_percent) >= rule["threshold"]:
        engine.load_clear_since = None
        if not engine.load_alerted:
            engine.load_alerted = True
            await app.alerts.raise_alert(
                "high_system_load",
                rule["severity"],
                f"System load high: CPU {load.cpu_percent}%, memory {load.memory_percent}%",
                action="Check the host; consumes are throttled",
                dedupe_day=day,
            )
    elif engine.load_alerted:
        engine.load_clear_since = engine.load_clear_since or now
        if now - engine.load_clear_since >= app.config["alerts.resolve_after"]:
            await app.alerts.end("high_system_load")
            engine.load_alerted, engine.load_clear_since = False, None
