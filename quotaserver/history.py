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
