"""What a plugin may read from the database: a narrow facade over the tables.

Plugins get the app in every hook; for figures that live in the database they call these
coroutines (``from quotaserver import readings``), never the models: the tables are the
core's to change. Each runs on a reader thread (``app.store.read``: its own connection, so
a long read never queues a consume) and answers plain values. Days are the quota calendar's
(``app.quota.calendar``): ``day_key`` is the daily window's key, ``since`` an aware datetime.

The built-in plugins (alert engine, quota analytics) read through this module only; a test
(tests/test_plugin_boundary.py) fails when a file under ``plugins/`` imports anything of
quotaserver beyond its top level.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from peewee import fn

from .models import Activity, Alert, DailyPeak, LoadRefusalMinute, User, Violation, naive_utc


async def violations_per_user(app: Any, since: datetime) -> Counter[int]:
    """Violations recorded since ``since``, per user id (every instance's)."""

    def read() -> Counter[int]:
        rows = Violation.select(Violation.user).where(Violation.created_at >= naive_utc(since))
        return Counter(row.user_id for row in rows)

    return await app.store.read(read)


async def user_violations(app: Any, user_id: int, since: datetime) -> int:
    """How many violations ``user_id`` has had since ``since`` (every instance's)."""

    def read() -> int:
        return (
            Violation.select()
            .where((Violation.user == user_id) & (Violation.created_at >= naive_utc(since)))
            .count()
        )

    return await app.store.read(read)


async def live_alert_rules(app: Any) -> set[str]:
    """The rules with an alert that is not resolved yet."""

    def read() -> set[str]:
        rows = Alert.select(Alert.rule).where(Alert.dedupe_key.is_null(False)).distinct()
        return {row.rule for row in rows}

    return await app.store.read(read)


async def users_with_live_alert(app: Any, rule: str) -> set[int]:
    """The user ids with an unresolved alert of ``rule``."""

    def read() -> set[int]:
        rows = Alert.select(Alert.user).where(
            (Alert.rule == rule) & Alert.dedupe_key.is_null(False) & Alert.user.is_null(False)
        )
        return {row.user_id for row in rows}

    return await app.store.read(read)


async def daily_peaks(app: Any, user_ids: list[int], day_key: int) -> dict[int, float]:
    """Each user's highest utilisation of a daily limit on ``day_key``, in percent (users
    without a limited command that day are left out)."""
    if not user_ids:
        return {}

    def read() -> dict[int, float]:
        rows = DailyPeak.select().where(
            DailyPeak.user.in_(list(user_ids)) & (DailyPeak.day == day_key)
        )
        # rank is minus the percent; 1 when every command type the user ran is unlimited.
        return {row.user_id: -row.rank for row in rows if row.rank <= 0}

    return await app.store.read(read)


async def active_users(app: Any, day_key: int, high_percent: float) -> tuple[int, int]:
    """Users active on ``day_key``, and those at ``high_percent`` or more of a daily limit
    (two counts of an index range)."""

    def read() -> tuple[int, int]:
        today = DailyPeak.select().where(DailyPeak.day == day_key)
        return today.count(), today.where(DailyPeak.rank <= -high_percent).count()

    return await app.store.read(read)


async def day_totals(app: Any, day_key: int) -> dict[str, int]:
    """Since the start of the day ``day_key`` (epoch seconds): commands admitted,
    violations, consumes refused for load; and the users in all, and the highest user id."""

    def read() -> dict[str, int]:
        totals = Activity.select(fn.SUM(Activity.commands), fn.SUM(Activity.violations))
        commands, violations = totals.where(Activity.minute >= day_key).tuples().first() or (0, 0)
        refused = (
            LoadRefusalMinute.select(fn.SUM(LoadRefusalMinute.refused))
            .where(LoadRefusalMinute.minute >= day_key)
            .scalar()
        )
        return {
            "commands": int(commands or 0),  # PostgreSQL sums are Decimals
            "violations": int(violations or 0),
            "load_refusals": int(refused or 0),
            "users": User.select().count(),
            "max_user_id": User.select(fn.MAX(User.id)).scalar() or 0,
        }

    return await app.store.read(read)
