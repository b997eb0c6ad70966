"""Window boundaries are exact instants in the configured zone, DST included."""

from datetime import UTC, datetime, timedelta

import pytest

from quotaserver.windows import WindowCalendar, isoformat


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def test_daily_window_in_a_zone_ahead_of_utc():
    cal = WindowCalendar("Asia/Tokyo")  # UTC+9: local midnight is 15:00 UTC the day before
    w = cal.window("daily", utc(2026, 3, 10, 14, 59))
    assert (w.start, w.end) == (utc(2026, 3, 9, 15), utc(2026, 3, 10, 15))
    assert cal.window("daily", utc(2026, 3, 10, 15, 0)).start == utc(2026, 3, 10, 15)


def test_dst_day_is_23_hours_and_resets_exactly():
    cal = WindowCalendar("America/New_York")  # DST starts 2026-03-08 02:00 local
    w = cal.window("daily", utc(2026, 3, 8, 12))
    assert w.start == utc(2026, 3, 8, 5)  # midnight EST
    assert w.end == utc(2026, 3, 9, 4)  # midnight EDT
    assert (w.end - w.start).total_seconds() == 23 * 3600


@pytest.mark.parametrize(
    ("week_start", "expected_start"),
    [("monday", utc(2026, 3, 9)), ("sunday", utc(2026, 3, 8)), ("wednesday", utc(2026, 3, 11))],
)
def test_week_start_is_configurable(week_start, expected_start):
    cal = WindowCalendar("UTC", week_start)
    w = cal.window("weekly", utc(2026, 3, 11, 10))  # a Wednesday
    assert w.start == expected_start
    assert (w.end - w.start).days == 7


def test_month_window_on_the_first_in_zone():
    cal = WindowCalendar("Europe/Paris")
    w = cal.window("monthly", utc(2026, 2, 28, 23, 30))  # already March 1st in Paris
    assert w.start == utc(2026, 2, 28, 23)
    assert w.end == utc(2026, 3, 31, 22)  # April 1st CEST (UTC+2)


def test_hourly_window_with_half_hour_offset():
    cal = WindowCalendar("Asia/Kolkata")  # UTC+5:30
    w = cal.window("hourly", utc(2026, 3, 10, 10, 45))
    assert w.start == utc(2026, 3, 10, 10, 30)
    assert w.end == utc(2026, 3, 10, 11, 30)


def test_isoformat_is_rfc3339_utc():
    assert isoformat(utc(2026, 3, 10, 12, 0)) == "2026-03-10T12:00:00.000Z"


def test_remembered_windows_equal_freshly_computed_ones_across_a_dst_change():
    # window() and windows() remember their last answer; stepping across the autumn change
    # (and back in time) must give exactly what a calendar without memory computes.
    cal = WindowCalendar("Europe/Berlin", "monday")
    start = datetime(2026, 10, 24, 20, 0, tzinfo=UTC)
    steps = [start + timedelta(minutes=20 * i) for i in range(40)]
    for now in steps + steps[::-1]:
        fresh = WindowCalendar("Europe/Berlin", "monday")
        for period in ("hourly", "daily", "weekly", "monthly"):
            assert cal.window(period, now) == fresh.window(period, now)
        periods = ("hourly", "daily", "weekly", "monthly")
        assert cal.windows(periods, now) == fresh.windows(periods, now)
