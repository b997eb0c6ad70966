"""Recent history for the dashboard charts: activity per minute, violations per day, load.

Activity and violations come from the database (the ``Activity`` table is maintained with
each decision; ``Violation`` rows are the record). CPU and memory are not persisted: the
``load_history`` plugin records each real sample of ``app.load`` into a :class:`LoadRing`
kept in memory, so the dashboard can draw the last minutes after a page load.
"""

from __future__ import annotations

import time
from collections import deque
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .models import Activity, Violation, naive_utc
from .throttle import LoadSample

if TYPE_CHECKING:
    from .app import QuotaApp
    from .windows import WindowCalendar

LOAD_PLUGIN = "load_history"  # the plugin that feeds the ring (its state holds it)
LOAD_WINDOW = 15 * 60.0  # seconds of load samples kept


class LoadRing:
    """The most recent load samples, oldest first, bounded by age and count."""

    def __init__(self, window: float = LOAD_WINDOW, max_samples: int = 2000):
        self.window = window
        self.samples: deque[LoadSample] = deque(maxlen=max_samples)

    def record(self, sample: LoadSample) -> bool:
        """Keep ``sample`` if it is a real, new measurement; return whether it was kept."""
        if sample.sampled_at <= 0:
            return False  # the placeholder before the first measurement: not data
        if self.samples and sample.sampled_at <= self.samples[-1].sampled_at:
            return False
        self.samples.append(sample)
        self._expire(sample.sampled_at)
        return True

    def since(self, seconds: float, now: float | None = None) -> list[dict[str, Any]]:
        """Samples of the last ``seconds``, as JSON points (``t`` in epoch seconds)."""
        now = time.time() if now is None else now
        self._expire(now)
        start = now - seconds
        return [
            {
                "t": round(s.sampled_at, 3),
                "cpu_percent": s.cpu_percent,
                "memory_percent": s.memory_percent,
                "throttle_factor": s.factor,
            }
            for s in self.samples
            if s.sampled_at >= start
        ]

    def _expire(self, now: float) -> None:
        while self.samples and self.samples[0].sampled_at < now - self.window:
            self.samples.popleft()


def load_ring(app: QuotaApp) -> LoadRing:
    """The application's ring of load samples (created empty on first use)."""
    state = app.plugin_state(LOAD_PLUGIN)
    if "ring" not in state:
        state["ring"] = LoadRing()
    return state["ring"]


def activity_per_minute(now: datetime, minutes: int) -> list[dict[str, Any]]:
    """Commands and violations per minute for the last ``minutes`` (current one included),
    zero-filled so a quiet minute is a real zero, oldest first. Runs on a DB thread."""
    current = int(now.timestamp()) // 60 * 60
    first = current - (minutes - 1) * 60
    rows = Activity.select().where((Activity.minute >= first) & (Activity.minute <= current))
    found = {row.minute: row for row in rows}
    points = []
    for minute in range(first, current + 1, 60):
        row = found.get(minute)
        points.append(
            {
                "t": minute,
                "commands": row.commands if row else 0,
                "violations": row.violations if row else 0,
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
