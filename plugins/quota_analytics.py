"""Quota analytics: the figures of the stats snapshot, kept without scanning users.

A stats tick reads in-memory figures only. At start-up they are read from the database
with a few indexed counts (never a pass over users or usage rows): the users, today's
commands, violations and load refusals from the per-minute tables, and today's active and
high-utilisation users from the maintained ``daily_peak`` table. Afterwards:

- commands, violations and load refusals are counted from decisions and ``violation``
  events;
- new users are counted from the user ids that decisions, ``quota_change`` and
  ``violation`` events carry (ids above the highest at start-up are kept in a set, so a
  user seen twice counts once);
- active and high-utilisation users are **recounted** from ``daily_peak`` (two indexed
  counts on a reader) when something may have changed them: a user's first command of a
  type today, a type's daily utilisation crossing 80%, an admin change to limits or usage,
  a new day. Requests that arrive while a recount runs are served by one more recount, so
  the figures are exact once the last one has finished. Recounts are paced: the next starts
  at least ``RECOUNT_GAP`` seconds (and ``RECOUNT_REST`` times its cost) after the previous
  one, so a stream of new users costs a recount a second, not one per consume (the stats
  tick that shows them comes every few seconds anyway). A user is "high" at a peak of
  80.0% or more of a daily limit (the percent the users page shows).

It also tells live dashboards whose usage changed: admitted commands are collected per
(user, command type) and sent at most once a second as one live-only ``usage`` event (no
seq, never replayed: a dashboard that missed some reloads over REST after
``recovered: false``), so the Users tab need not poll.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from datetime import datetime
from typing import Any

from quotaserver import DatabaseError, PeriodicEmitter, hookimpl, readings, utilization

NAME = "quota_analytics"
HIGH_PERCENT = 80.0
THROTTLE_WINDOW = 300.0  # seconds of decisions behind average_throttle_factor
USAGE_EVENT = "usage"
USAGE_INTERVAL = 1.0  # seconds between two usage events (at most)
USAGE_ROWS = 500  # rows per usage event; more changes set "truncated"
RECOUNT_GAP = 1.0  # seconds from one recount of active/high users to the next, at least
RECOUNT_REST = 10.0  # ... and this many times the last recount's duration


class Figures:
    def __init__(self) -> None:
        self.day_key: int | None = None
        self.users_at_start = 0
        self.max_user_id_at_start = 0
        self.new_users: set[int] = set()  # created since start-up
        self.active = 0  # users with a command today
        self.high = 0  # users at >= HIGH_PERCENT of a daily limit today
        self.commands = 0
        self.violations = 0
        self.load_refusals = 0  # consumes refused for load (throttle factor 0) today
        self.recounting = False  # a recount of active/high is running
        self.dirty = False  # ... and another one is wanted after it
        self.next_recount = 0.0  # monotonic time before which no recount starts
        self.changed: dict[tuple[int, str], dict[str, Any]] = {}  # for the next usage event
        self.truncated = False
        # Throttle factors of recent decisions, per second: [second, sum, count].
        self.factors: deque[list[float]] = deque()
        self.factor_sum = 0.0
        self.factor_count = 0

    def new_day(self, day_key: int) -> None:
        self.day_key = day_key
        self.active = self.high = 0
        self.commands = self.violations = self.load_refusals = 0

    @property
    def total_users(self) -> int:
        return self.users_at_start + len(self.new_users)

    def saw_user(self, user_id: int | None) -> None:
        if user_id is not None and user_id > self.max_user_id_at_start:
            self.new_users.add(user_id)

    def add_factor(self, factor: float, now: float) -> None:
        second = float(int(now))
        if self.factors and self.factors[-1][0] == second:
            bucket = self.factors[-1]
            bucket[1] += factor
            bucket[2] += 1
        else:
            self.factors.append([second, factor, 1])
            self._expire(now)
        self.factor_sum += factor
        self.factor_count += 1

    def _expire(self, now: float) -> None:
        while self.factors and self.factors[0][0] < now - THROTTLE_WINDOW:
            _second, total, count = self.factors.popleft()
            self.factor_sum -= total
            self.factor_count -= int(count)

    def average_factor(self, now: float) -> float | None:
        self._expire(now)
        if not self.factor_count:
            return None
        return round(self.factor_sum / self.factor_count, 3)


def _figures(app: Any) -> Figures:
    state = app.plugin_state(NAME)
    if "figures" not in state:
        state["figures"] = Figures()
    return state["figures"]


def _today(app: Any) -> Any:
    return app.quota.calendar.window("daily", app.clock())


async def rebuild(app: Any) -> None:
    """Today's figures from the database (at start-up). Activity counts what was admitted
    and refused, so a later usage reset does not make today's commands disappear."""
    today = _today(app)
    active, high = await readings.active_users(app, today.key, HIGH_PERCENT)
    totals = await readings.day_totals(app, today.key)
    fig = _figures(app)
    fig.new_day(today.key)
    fig.users_at_start, fig.max_user_id_at_start = totals["users"], totals["max_user_id"]
    fig.new_users = set()
    fig.active, fig.high = active, high
    fig.commands, fig.violations = totals["commands"], totals["violations"]
    fig.load_refusals = totals["load_refusals"]


def request_recount(app: Any) -> None:
    """Recount active and high-utilisation users soon (one recount at a time)."""
    fig = _figures(app)
    if fig.recounting:
        fig.dirty = True
        return
    fig.recounting = True
    app.track(_recount(app, fig))


async def _recount(app: Any, fig: Figures) -> None:
    try:
        while True:
            wait = fig.next_recount - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)  # paced (see the module doc); changes meanwhile join
            fig.dirty = False
            today = _today(app)
            started = time.monotonic()
            try:
                active, high = await readings.active_users(app, today.key, HIGH_PERCENT)
            except DatabaseError:  # counted in health; the next change asks again
                return
            finally:
                cost = time.monotonic() - started
                fig.next_recount = time.monotonic() + max(RECOUNT_GAP, RECOUNT_REST * cost)
            if fig.day_key == today.key:
                fig.active, fig.high = active, high
            if not fig.dirty:
                return
    finally:
        fig.recounting = False


def _may_change_peaks(decision: Any) -> bool:
    """Whether an admitted decision can change who is active or high today."""
    daily = decision.periods.get("daily")
    if daily is None:
        return False  # no daily window: no peaks, nobody counted
    before = daily.used - decision.count
    if before <= 0:
        return True  # the user's first command of this type today
    was, now = utilization(before, daily.limit), utilization(daily.used, daily.limit)
    return was is not None and now is not None and was < HIGH_PERCENT <= now


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
    if decision.reason == "system_overloaded":
        fig.load_refusals += 1
    if decision.consumed and decision.user_id is not None:
        fig.commands += decision.count
        if _may_change_peaks(decision):
            request_recount(app)
        _note_usage(fig, decision)


def _note_usage(fig: Figures, decision: Any) -> None:
    """Remember the user's daily usage of this command type for the next usage event."""
    daily = decision.periods.get("daily")
    if daily is None:
        return
    key = (decision.user_id, decision.command_type)
    if key not in fig.changed and len(fig.changed) >= USAGE_ROWS:
        fig.truncated = True
        return
    fig.changed[key] = {
        "user_id": decision.user_id,
        "username": decision.user,
        "command_type": decision.command_type,
        "used": daily.used,
        "limit": daily.limit,
        "percent": utilization(daily.used, daily.limit),
    }


async def _send_usage(app: Any, emit: Any) -> None:
    fig = _figures(app)
    if not fig.changed and not fig.truncated:
        return
    rows, truncated = list(fig.changed.values()), fig.truncated
    fig.changed, fig.truncated = {}, False
    await emit(USAGE_EVENT, {"users": rows, "truncated": truncated}, durable=False)


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
    # Limits or usage changed by an admin (the peaks were recomputed in its transaction):
    # only active and high users depend on them. (Counts of commands and violations stay
    # incremental: recomputing them here would race with decisions already counted.)
    if message.type == "quota_change":
        request_recount(app)
        if message.data.get("action") == "usage_reset":
            # Counts from before the reset must not reach dashboards after it.
            reset_type = message.data.get("command_type")
            for key in [k for k in fig.changed if k[0] == message.data.get("user_id")]:
                if reset_type is None or key[1] == reset_type:
                    del fig.changed[key]


@hookimpl
def register_event_types() -> list[str]:
    return [USAGE_EVENT]


@hookimpl
def register_emitters(app: Any) -> list[PeriodicEmitter]:
    async def send_usage(emit: Any) -> None:
        await _send_usage(app, emit)

    emitters = [PeriodicEmitter("usage_updates", USAGE_INTERVAL, send_usage)]
    # Several instances share the database: each one's decisions are only part of the
    # picture, so every instance recomputes the figures from it each stats interval.
    if app.clustered:
        interval = app.config["realtime.stats_interval"]
        emitters.append(PeriodicEmitter("cluster_figures", interval, lambda: rebuild(app)))
    return emitters


@hookimpl
def stats_fields(app: Any) -> dict[str, Any]:
    fig = _figures(app)
    today = _today(app)
    if fig.day_key is not None and fig.day_key != today.key:
        fig.new_day(today.key)
    return {
        "total_users": fig.total_users,
        "active_users_today": fig.active,
        "commands_today": fig.commands,
        "violations_today": fig.violations,
        "load_refusals_today": fig.load_refusals,
        "high_utilization_count": fig.high,
        "average_throttle_factor": fig.average_factor(time.time()),
    }
