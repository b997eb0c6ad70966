"""Throttle: hysteresis, hold time, the load source, one log line and one event per change."""

from __future__ import annotations

import logging

import psutil
import pytest
from clients import consume
from waits import wait_until

from quotaserver.config import load_config
from quotaserver.models import Event
from quotaserver.throttle import LoadRing, LoadSample, SystemLoad

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


def test_a_new_sampler_starts_at_rest_and_shows_no_history():
    load = SystemLoad(CPU, CPU)
    assert (load.source, load.hysteresis, load.hold_seconds) == ("host", 0.0, 0.0)
    assert load.current == LoadSample(0.0, 0.0, 1.0, 0.0)  # the placeholder: not a sample
    assert list(load.history.samples) == [] and load.history.since(60) == []
    # No margin by default: the band is left as soon as the load is under its threshold.
    load.update(80, 80, now=0)
    assert load.update(79.9, 79.9, now=1)[0].factor == 1.0


def test_the_first_sample_under_a_threshold_enters_no_band_whatever_the_margin():
    """Levels start at 0 for both loads: 78 % is within the 5-point margin of the 80 band,
    which matters only for leaving a band that was entered."""
    load = SystemLoad(CPU, CPU, hysteresis=5.0)
    assert load.update(78, 78, now=0) == (load.current, False)
    assert (load.factor, load.refusing) == (1.0, "none")


def test_a_reversal_within_the_hold_restarts_its_clock():
    load = SystemLoad(CPU, QUIET, hold_seconds=10.0)
    load.update(96, 10, now=0)
    assert load.update(96, 10, now=10)[0].factor == 0.3
    load.update(50, 10, now=20)  # wants 1.0 (up) from 20
    load.update(99, 10, now=25)  # now wants 0.0 (down): a new wish, held from 25
    assert load.update(99, 10, now=30)[0].factor == 0.3
    assert load.update(99, 10, now=34.9)[0].factor == 0.3
    assert load.update(99, 10, now=35) == (load.current, True)
    assert (load.factor, load.refusing) == (0.0, "cpu")


def test_levels_follow_at_once_while_the_factor_stays():
    """Memory reaching the band that CPU already refuses in changes no factor, so it waits
    for no hold: which load refuses is right from that sample on."""
    zero = [[90, 0.0]]
    load = SystemLoad(zero, zero, hold_seconds=10.0)
    load.update(95, 10, now=0)
    load.update(95, 10, now=10)
    assert (load.factor, load.refusing) == (0.0, "cpu")
    load.update(50, 95, now=11)
    assert (load.factor, load.refusing) == (0.0, "memory")


def test_a_sample_shows_the_load_to_one_decimal():
    load = SystemLoad(CPU, CPU)
    sample, _ = load.update(12.345, 67.891, now=0)
    assert (sample.cpu_percent, sample.memory_percent) == (12.3, 67.9)


def test_the_sampler_takes_every_setting_from_the_config():
    config = load_config(
        None,
        env={},
        overrides={
            "throttle.cpu_bands": [[50, 0.5]],
            "throttle.memory_bands": [[60, 0.2]],
            "throttle.hysteresis": 4.0,
            "throttle.hold_seconds": 7.0,
            "throttle.source": "process",
        },
    )
    load = SystemLoad.from_config(config)
    assert (load.hysteresis, load.hold_seconds, load.source) == (4.0, 7.0, "process")
    assert (load.cpu_bands.thresholds, load.memory_bands.factors) == ([50.0], [1.0, 0.2])


def _sample(at: float, cpu: float = 1.0) -> LoadSample:
    return LoadSample(cpu, 2.0, 1.0, at)


def test_the_load_ring_keeps_real_new_samples_only():
    ring = LoadRing(window=100.0, max_samples=3)
    assert ring.record(_sample(0.0)) is False  # the placeholder before a first measurement
    assert ring.record(_sample(1.0)) is True
    assert ring.record(_sample(1.0)) is False  # not newer than the last one
    assert ring.record(_sample(0.5)) is False
    for at in (2.0, 3.0, 4.0):
        assert ring.record(_sample(at)) is True
    assert [s.sampled_at for s in ring.samples] == [2.0, 3.0, 4.0]  # bounded by count


def test_the_load_ring_is_bounded_by_age_and_answers_a_window():
    ring = LoadRing(window=100.0)
    for at in (1000.0, 1050.0, 1100.0):
        ring.record(_sample(at, cpu=at / 100))
    # A sample exactly one window old is kept; an older one goes.
    assert [s.sampled_at for s in ring.samples] == [1000.0, 1050.0, 1100.0]
    ring.record(_sample(1150.5004, cpu=11.505004))
    assert [s.sampled_at for s in ring.samples] == [1100.0, 1150.5004]
    assert ring.since(50, now=1150.0) == [  # from exactly 50 s before now
        {"t": 1100.0, "cpu_percent": 11.0, "memory_percent": 2.0, "throttle_factor": 1.0},
        {"t": 1150.5, "cpu_percent": 11.505004, "memory_percent": 2.0, "throttle_factor": 1.0},
    ]
    assert [p["t"] for p in ring.since(1000, now=1200.1)] == [1150.5]  # 1100 expired
    assert ring.since(10, now=5000.0) == [] and len(ring.samples) == 0


def test_source_off_never_throttles():
    load = SystemLoad(CPU, CPU, source="off")
    sample, changed = load.update(100, 100, now=0)
    assert (sample.factor, changed) == (1.0, False)
    assert sample.cpu_percent == 100  # still shown on the dashboard


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
    await wait_until(lambda: app.load.factor == 0.5, "the factor to change")
    runs = health.runs
    await wait_until(lambda: health.runs >= runs + 10, "ten more samples")
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
    await wait_until(lambda: health.runs >= 10, "ten samples")
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
