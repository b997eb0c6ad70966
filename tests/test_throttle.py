"""Throttle: hysteresis, hold time, the load source, one log line and one event per change."""

from __future__ import annotations

import asyncio
import logging

import psutil
import pytest
from clients import consume

from quotaserver.models import Event
from quotaserver.throttle import SystemLoad

CPU = [[98, 0.0], [95, 0.3], [90, 0.6], [80, 0.8]]
QUIET = [[100, 1.0]]


def test_a_band_is_left_only_below_its_threshold_minus_the_margin():
    load = SystemLoad(CPU, QUIET, hysteresis=5.0)
    assert load.update(85, 10, now=0)[0].factor == 0.8
    # Back under 80 but not under 75: still in the 80 band.
    for cpu in (79.9, 77, 75.1):
        sample, changed = load.update(cpu, 10, now=1)
        assert (sample.factor, changed) == (0.8, False), cpu
    assert load.update(74.9, 10, now=2) == (load.current, True)
    assert load.factor == 1.0
    # Falling from the 95 band to 88: leaves 95 (88 + 5 < 95) but 88 + 5 >= 90 keeps 90.
    load.update(96, 10, now=3)
    assert load.factor == 0.3
    load.update(88, 10, now=4)
    assert load.factor == 0.6
    # Rising is immediate whatever the margin.
    load.update(99, 10, now=5)
    assert load.factor == 0.0


def test_memory_bands_keep_the_same_margin_as_cpu_bands():
    load = SystemLoad(QUIET, CPU, hysteresis=5.0)
    assert load.update(10, 85, now=0)[0].factor == 0.8
    for memory in (79.9, 77, 75.1):  # under 80 but not under 75: still in the 80 band
        sample, changed = load.update(10, memory, now=1)
        assert (sample.factor, changed) == (0.8, False), memory
    assert load.update(10, 74.9, now=2) == (load.current, True)
    assert load.factor == 1.0
    load.update(10, 96, now=3)
    assert (load.factor, load.refusing) == (0.3, "none")
    load.update(10, 88, now=4)  # leaves 95 but 88 + 5 >= 90 keeps the 90 band
    assert load.factor == 0.6


def test_a_change_applies_only_after_it_held():
    load = SystemLoad(CPU, QUIET, hysteresis=0.0, hold_seconds=10.0)
    assert load.update(91, 10, now=0) == (load.current, False)
    assert load.update(92, 10, now=9.9)[0].factor == 1.0
    sample, changed = load.update(96, 10, now=10.0)
    assert (sample.factor, changed) == (0.3, True)  # the latest wanted band applies
    # A dip shorter than the hold changes nothing; the clock restarts after it.
    load.update(50, 10, now=11)
    load.update(96, 10, now=15)
    load.update(50, 10, now=16)
    assert load.update(50, 10, now=25.9)[0].factor == 0.3
    assert load.update(50, 10, now=26.0) == (load.current, True)
    assert load.factor == 1.0


def test_source_off_never_throttles():
    load = SystemLoad(CPU, CPU, source="off")
    sample, changed = load.update(100, 100, now=0)
    assert (sample.factor, changed) == (1.0, False)
    assert sample.cpu_percent == 100  # still shown on the dashboard


async def _until(condition, what: str, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def _throttle_events() -> list[dict]:
    return [row.payload() for row in Event.select().where(Event.type == "throttle")]


@pytest.mark.parametrize("source", ["host", "process"])
@pytest.mark.gen_test(timeout=60)
async def test_one_log_line_and_one_event_per_change_that_held(app_factory, caplog, source):
    """The real system-metrics plugin sampling this machine: any CPU reaches the 0 % band,
    so the factor changes exactly once, after the hold, however many samples follow."""
    caplog.set_level(logging.INFO, logger="quotaserver.throttle")
    app = await app_factory(
        plugins={"system_metrics": {"interval": 0.05}},
        throttle__cpu_bands=[[0, 0.5]],
        throttle__memory_bands=QUIET,
        throttle__hold_seconds=0.3,
        throttle__source=source,
    )
    health = app.scheduler.sources["system_metrics"]
    await _until(lambda: app.load.factor == 0.5, "the factor to change")
    runs = health.runs
    await _until(lambda: health.runs >= runs + 10, "ten more samples")
    events = await app.store.run(_throttle_events)
    assert len(events) == 1, events
    assert events[0]["previous_factor"] == 1.0 and events[0]["throttle_factor"] == 0.5
    lines = [r for r in caplog.records if r.name == "quotaserver.throttle"]
    assert [r.getMessage().split(" (")[0] for r in lines] == ["throttle factor 1.0 -> 0.5"]
    assert source in lines[0].getMessage()
    if source == "process":
        # This process's resident memory, not the whole machine's memory in use.
        assert app.load.current.memory_percent < psutil.virtual_memory().percent


@pytest.mark.gen_test(timeout=30)
async def test_source_off_samples_but_never_throttles(app_factory):
    app = await app_factory(
        plugins={"system_metrics": {"interval": 0.05}},
        throttle__cpu_bands=[[0, 0.0]],
        throttle__source="off",
    )
    health = app.scheduler.sources["system_metrics"]
    await _until(lambda: health.runs >= 10, "ten samples")
    assert app.load.factor == 1.0
    assert await app.store.run(_throttle_events) == []
    assert (await consume(app, "ann")).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_throttled_503s_are_logged_at_info(app_factory, caplog):
    caplog.set_level(logging.DEBUG, logger="tornado.access")
    app = await app_factory(throttle__cpu_bands=CPU)  # a band at 0: the defaults never refuse
    app.load.update(99.5, 10)
    assert (await consume(app, "ann")).code == 503
    records = [r for r in caplog.records if r.name == "tornado.access" and "503" in r.getMessage()]
    assert [r.levelno for r in records] == [logging.INFO], [r.getMessage() for r in records]
