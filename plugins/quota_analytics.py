"""Quota analytics: the figures of the stats snapshot, kept incrementally.

A stats tick reads in-memory figures only. They are rebuilt from the database at start-up
(and after an admin change to limits or usage), then updated from each decision.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from quotaserver import hookimpl
from quotaserver.models import Usage, User, Violation, naive_utc

NAME = "quota_analytics"
HIGH_UTILIZATION = 0.8
THROTTLE_WINDOW = 300.0  # seconds of decisions behind average_throttle_factor


class Figures:
    def __init__(self) -> None:
        self.day_key: int | None = None
        self.total_users = 0
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


def _rebuild(app: Any) -> dict[str, Any]:
    """One pass over today's daily counters (runs on a database thread)."""
    today = _today(app)
    active: set[int] = set()
    high: set[int] = set()
    commands = 0
    rows = Usage.select(Usage.user, Usage.command_type, Usage.used).where(
        (Usage.period == "daily") & (Usage.window_start == today.key) & (Usage.used > 0)
    )
    for row in rows:
        active.add(row.user_id)
        commands += row.used
        limit = app.quota.limits_for(row.user_id, row.command_type).get("daily")
        if limit and row.used >= HIGH_UTILIZATION * limit:
            high.add(row.user_id)
    return {
        "day_key": today.key,
        "total_users": User.select().count(),
        "active": active,
        "high": high,
        "commands": commands,
        "violations": Violation.select()
        .where(Violation.created_at >= naive_utc(today.start))
        .count(),
    }


async def rebuild(app: Any) -> None:
    data = await app.store.run(_rebuild, app)
    fig = _figures(app)
    fig.new_day(data["day_key"])
    fig.total_users = data["total_users"]
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
    if decision.new_user:
        fig.total_users += 1
    if decision.reason == "quota_exceeded":
        fig.violations += 1
    if decision.consumed and decision.user_id is not None:
        fig.commands += decision.count
        fig.active.add(decision.user_id)
        daily = decision.periods.get("daily")
        if daily and daily.limit and daily.used >= HIGH_UTILIZATION * daily.limit:
            fig.high.add(decision.user_id)


@hookimpl
def on_event(app: Any, message: Any) -> Any:
    # Limits or usage changed by an admin: utilisation figures must be recomputed.
    if message.type == "quota_change":
        return rebuild(app)
    return None


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
            "cpu_percent": load.cpu_percent,
            "memory_percent": load.memory_percent,
            "throttle_factor": load.factor,
            "throttle_active": load.throttle_active,
        },
    }
