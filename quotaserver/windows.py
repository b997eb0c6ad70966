"""Quota windows: exact [start, end) instants for hourly, daily, weekly and monthly periods.

Boundaries are wall-clock midnights (or hours) in the configured time zone, so a day in a
zone that changes to summer time is 23 hours long and its reset is still exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from .config import WEEKDAYS

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def isoformat(ts: datetime) -> str:
    """RFC 3339 in UTC with a ``Z`` suffix and millisecond precision."""
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Window:
    period: str
    start: datetime  # aware, UTC
    end: datetime  # aware, UTC
    #: Stable integer key of the window (its start in epoch seconds).
    key: int = field(init=False, compare=False)
    #: ``end`` as the API shows it (isoformat), built once per window.
    end_text: str = field(init=False, compare=False, repr=False)
    #: The window's length in seconds (a month's varies; DST days are 23 or 25 hours).
    seconds: int = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", int(self.start.timestamp()))
        object.__setattr__(self, "seconds", round((self.end - self.start).total_seconds()))
        object.__setattr__(self, "end_text", isoformat(self.end))


class WindowCalendar:
    """Computes windows in one time zone with a configurable first day of the week."""

    def __init__(self, timezone: str = "UTC", week_start: str = "monday"):
        self.tz = ZoneInfo(timezone)
        self.week_start = WEEKDAYS.index(week_start)
        # The last windows() answer and the instants [since, until) it holds for: windows
        # partition time, so every instant in the intersection of these windows has them.
        self._cached: tuple[tuple[str, ...], datetime, datetime, dict[str, Window]] | None = None
        self._last: dict[str, Window] = {}  # per period, the last window() answer

    def window(self, period: str, now: datetime) -> Window:
        """The ``period`` window that holds ``now`` (an aware datetime)."""
        last = self._last.get(period)
        if last is not None and now.tzinfo is not None and last.start <= now < last.end:
            return last  # hot path: every decision asks for the day it falls in
        found = self._window(period, now)
        self._last[period] = found
        return found

    def _midnight(self, day: date) -> datetime:
        return datetime(day.year, day.month, day.day, tzinfo=self.tz).astimezone(UTC)

    def _window(self, period: str, now: datetime) -> Window:
        local = now.astimezone(self.tz)
        if period == "hourly":
            start_local = local.replace(minute=0, second=0, microsecond=0)
            start = start_local.astimezone(UTC)
            return Window(period, start, start + timedelta(hours=1))
        day = local.date()
        if period == "daily":
            return Window(period, self._midnight(day), self._midnight(day + timedelta(days=1)))
        if period == "weekly":
            first = day - timedelta(days=(day.weekday() - self.week_start) % 7)
            return Window(period, self._midnight(first), self._midnight(first + timedelta(days=7)))
        if period == "monthly":
            first = day.replace(day=1)
            nxt = (first + timedelta(days=32)).replace(day=1)
            return Window(period, self._midnight(first), self._midnight(nxt))
        raise ValueError(f"unknown period {period!r}")

    def windows(self, periods: tuple[str, ...], now: datetime) -> dict[str, Window]:
        """The window of each period that holds ``now`` (a new dict each call)."""
        cached = self._cached  # one read: other threads may replace it meanwhile
        if cached is not None:
            cached_periods, since, until, found = cached
            if cached_periods == periods and since <= now < until:
                return dict(found)
        found = {p: self._window(p, now) for p in periods}
        if found:
            since = max(w.start for w in found.values())
            until = min(w.end for w in found.values())
            self._cached = (periods, since, until, found)
        return dict(found)
