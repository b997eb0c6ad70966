"""Quota analytics: the figures of the stats snapshot, kept incrementally.

A stats tick reads in-memory figures only. They are rebuilt from the database at start-up,
then updated from what happens next: decisions (commands, active users), and the durable
events every other path publishes after commit. A user can be created by a consume, an
admin change (``quota_change``) or a recorded violation (``violation``, also from the
development endpoints and plugins); each carries the user id, and ids above the highest one
at start-up are kept in a set, so seeing a user twice never counts it twice. Violations are
counted from ``violation`` events only, whoever recorded them. An admin change to limits or
usage recomputes the high-utilisation set, the one figure that depends on them.
"""

from __future__ import annotations

import time
from collections import deque
from datetime import datetime
from typing import Any

from peewee import fn

from quotaserver import hookimpl
from quotaserver.limits import Rules
from quotaserver.models import Activity, Usage, User
from quotaserver.realtime.emitters import PeriodicEmitter

NAME = "quota_analytics"
HIGH_UTILIZATION = 0.8
THROTTLE_WINDOW = 300.0  # seconds of decisions behind average_throttle_factor


class Figures:
    def __init__(self) -> None:
        self.day_key: int | None = None
        self.users_at_start = 0
        self.max_user_id_at_start = 0
        self.new_users: set[int] = set()  # created since start-up
        self.active: set[int] = set()
        self.commands = 0
        self.violations = 0
        self.high: set[int] = set()
        self.factors: deque[tuple[float, float]] = deque()
        self.factor_sum = 0.0

    def new_day(self, day_key: int) -> None:
        self.day_key = day_key
        self.active, self.high = set(), set()
        self.commands = self.violations = 0

    @property
    def total_users(self) -> int:
        return self.users_at_start + len(self.new_users)

    def saw_user(self, user_id: int | None) -> None:
        if user_id is not None and user_id > self.max_user_id_at_start:
            self.new_users.add(user_id)

    def add_factor(self, factor: float, now: float) -> None:
        self.factors.append((now, factor))
        self.factor_sum += factor
        self._expire(now)

    def _expire(self, now: float) -> None:
        while self.factors and self.factors[0][0] < now - THROTTLE_WINDOW:
            self.factor_sum -= self.factors.popleft()[1]

    def average_factor(self, now: float) -> float | None:
        self._expire(now)
        if not self.factors:
            return None
        return round(self.factor_sum / len(self.factors), 3)


def _figures(app: Any) -> Figures:
    state = app.plugin_state(NAME)
    if "figures" not in state:
        state["figures"] = Figures()
    return state["figures"]


def _today(app: Any) -> Any:
    return app.quota.calendar.window("daily", app.clock())


def _high_users(app: Any, today: Any) -> tuple[set[int], set[int]]:
    """Users active today, and those at >= 80% of a daily limit (one pass, rules in bulk)."""
    rules = Rules()  # every rule in one query
    active: set[int] = set()
    high: set[int] = set()
    rows = Usage.select(Usage.user, Usage.command_type, Usage.used).where(
        (Usage.period == "daily") & (Usage.window_start == today.key) & (Usage.used > 0)
    )
    for user_id, command_type, used in rows.tuples():
        active.add(user_id)
        limit = rules.limit(user_id, command_type, "daily")
        if limit and used >= HIGH_UTILIZATION * limit:
            high.add(user_id)
    return active, high


def _rebuild(app: Any) -> dict[str, Any]:
    """Today's figures from the database (runs on a database thread, at start-up)."""
    today = _today(app)
    active, high = _high_users(app, today)
    # Activity counts what was admitted and refused, so a later usage reset does not
    # make today's commands disappear from the stats.
    totals = Activity.select(fn.SUM(Activity.commands), fn.SUM(Activity.violations)).where(
        Activity.minute >= today.key
    )
    commands, violations = totals.tuples().first() or (0, 0)
    return {
        "day_key": today.key,
        "total_users": User.select().count(),
        "max_user_id": User.select(fn.MAX(User.id)).scalar() or 0,
        "active": active,
        "high": high,
        "commands": int(commands or 0),  # PostgreSQL sums are Decimals
        "violations": int(violations or 0),
    }


async def rebuild(app: Any) -> None:
    data = await app.store.read(_rebuild, app)
    fig = _figures(app)
    fig.new_day(data["day_key"])
    fig.users_at_start, fig.max_user_id_at_start = data["total_users"], data["max_user_id"]
    fig.new_users = set()
    fig.active, fig.high = data["active"], data["high"]
    fig.commands, fig.violations = data["commands"], data["violations"]


@hookimpl
def startup(app: Any) -> Any:
    return rebuild(app)


@hookimpl
def on_decision(app: Any, decision: Any) -> None:
    fig = _figures(app)
    day_key = app.quota.calendar.window("daily", decision.at).key
    if day_key != fig.day_key:
        fig.new_day(day_key)
    fig.add_factor(decision.throttle_factor, time.time())
    fig.saw_user(decision.user_id)
    if decision.consumed and decision.user_id is not None:
        fig.commands += decision.count
        fig.active.add(decision.user_id)
        daily = decision.periods.get("daily")
        if daily and daily.limit and daily.used >= HIGH_UTILIZATION * daily.limit:
            fig.high.add(decision.user_id)


@hookimpl
async def on_event(app: Any, message: Any) -> None:
    fig = _figures(app)
    if message.type in ("violation", "quota_change"):
        fig.saw_user(message.data.get("user_id"))
    if message.type == "violation":
        at = datetime.fromisoformat(message.timestamp)
        day_key = app.quota.calendar.window("daily", at).key
        if fig.day_key is None or day_key > fig.day_key:
            fig.new_day(day_key)
        if day_key == fig.day_key:
            fig.violations += 1
    # Limits or usage changed by an admin: only utilisation depends on them. (Counts of
    # commands and violations stay incremental: recomputing them here would race with
    # decisions already counted.)
    if message.type == "quota_change":
        today = _today(app)
        _, high = await app.store.read(_high_users, app, today)
        fig = _figures(app)
        if fig.day_key == today.key:
            fig.high = high


@hookimpl
def register_emitters(app: Any) -> list[PeriodicEmitter]:
    # Several instances share the database: each one's decisions are only part of the
    # picture, so every instance recomputes the figures from it each stats interval.
    if not app.clustered:
        return []
    interval = app.config["realtime.stats_interval"]
    return [PeriodicEmitter("cluster_figures", interval, lambda: rebuild(app))]


@hookimpl
def stats_fields(app: Any) -> dict[str, Any]:
    fig = _figures(app)
    load = app.load.current
    today = _today(app)
    if fig.day_key is not None and fig.day_key != today.key:
        fig.new_day(today.key)
    return {
        "total_users": fig.total_users,
        "active_users_today": len(fig.active),
        "commands_today": fig.commands,
        "violations_today": fig.violations,
        "high_utilization_count": len(fig.high),
        "average_throttle_factor": fig.average_factor(time.time()),
        "system_load": {
            "instance": app.instance_name,
            "cpu_percent": load.cpu_percent,
            "memory_percent": load.memory_percent,
            "throttle_factor": load.factor,
            "throttle_active": load.throttle_active,
        },
    }
