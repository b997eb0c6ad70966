"""Recent history for the dashboard charts: activity per minute, violations per day.

Activity and violations come from the database (the ``Activity`` and
``LoadRefusalMinute`` tables are maintained with each decision; ``Violation`` rows are the
record). CPU and memory are not persisted: the
load sampler keeps its own recent history (``app.load.history``, see
:mod:`quotaserver.throttle`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from peewee import fn

from .models import Activity, LoadRefusalMinute, Violation, naive_utc

if TYPE_CHECKING:
    from .windows import WindowCalendar


def activity_per_minute(now: datetime, minutes: int) -> list[dict[str, Any]]:
    """Commands admitted, violations and consumes refused for load per minute for the last
    ``minutes`` (current one included, ``partial``: it is still being counted), zero-filled
    so a quiet minute is a real zero, oldest first. Runs on a DB thread."""
    current = int(now.timestamp()) // 60 * 60
    first = current - (minutes - 1) * 60
    rows = Activity.select().where((Activity.minute >= first) & (Activity.minute <= current))
    found = {row.minute: row for row in rows}
    refused = dict(
        LoadRefusalMinute.select(LoadRefusalMinute.minute, LoadRefusalMinute.refused)
        .where((LoadRefusalMinute.minute >= first) & (LoadRefusalMinute.minute <= current))
        .tuples()
    )
    points = []
    for minute in range(first, current + 1, 60):
        row = found.get(minute)
        points.append(
            {
                "t": minute,
                "commands": row.commands if row else 0,
                "violations": row.violations if row else 0,
                "refused": refused.get(minute, 0),
                **({"partial": True} if minute == current else {}),
            }
        )
    return points


def activity_per_bucket(now: datetime, minutes: int, bucket: int) -> list[dict[str, Any]]:
    """``activity_per_minute`` summed into ``bucket``-second buckets (aligned to the epoch, so
    day buckets are UTC days) covering the last ``minutes``; the current one is ``partial``.
    One grouped range read per table. DB thread."""
    if bucket == 60:
        return activity_per_minute(now, minutes)
    current = int(now.timestamp()) // bucket * bucket
    first = current - (minutes * 60 // bucket - 1) * bucket
    key = (Activity.minute / bucket) * bucket
    totals = {
        b: (c, v)
        for b, c, v in Activity.select(key, fn.SUM(Activity.commands), fn.SUM(Activity.violations))
        .where(Activity.minute >= first)
        .group_by(key)
        .tuples()
    }
    rkey = (LoadRefusalMinute.minute / bucket) * bucket
    refused = dict(
        LoadRefusalMinute.select(rkey, fn.SUM(LoadRefusalMinute.refused))
        .where(LoadRefusalMinute.minute >= first)
        .group_by(rkey)
        .tuples()
    )
    points = []
    for start in range(first, current + 1, bucket):
        commands, violations = totals.get(start, (0, 0))
        point = {
            "t": start,
            # PostgreSQL sums are Decimals
            "commands": int(commands or 0),
            "violations": int(violations or 0),
            "refused": int(refused.get(start) or 0),
        }
        if start == current:
            point["partial"] = True
        points.append(point)
    return points


def violations_per_day(calendar: WindowCalendar, now: datetime, days: int) -> list[dict]:
    """Violations per calendar day (in the quota time zone) for the last ``days``, oldest
    first. One indexed COUNT per day: exact across DST days, portable SQL. DB thread."""
    out = []
    today = calendar.window("daily", now)
    for back in range(days - 1, -1, -1):
        # A day is 23 to 25 hours long: step back from today's midnight by whole days and
        # let the calendar find the exact window that contains that instant.
        window = calendar.window("daily", today.start - timedelta(days=back) + timedelta(hours=12))
        count = (
            Violation.select()
            .where(
                (Violation.created_at >= naive_utc(window.start))
                & (Violation.created_at < naive_utc(window.end))
            )
            .count()
        )
        out.append(
            {
                "date": window.start.astimezone(calendar.tz).date().isoformat(),
                "start": int(window.start.timestamp()),
                "violations": count,
            }
        )
    return out
