"""The emitter scheduler in isolation: back-off, timeouts, start/stop failures.

Back-off delays go through an injected ``sleep`` that records them and returns at once, and
timestamps come from an injected clock, so no test waits for the delays it checks.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
from waits import wait_until

from quotaserver.realtime.emitters import (
    EventEmitter,
    PeriodicEmitter,
    PluginError,
    Scheduler,
    SourceHealth,
    maybe_await,
)

NOW = 1_700_000_000.0


class Sleeps:
    """An injected ``sleep``: records each delay and yields once instead of waiting."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


async def emit(type: str, data: dict) -> None:
    raise AssertionError("no emitter in these tests emits")


def scheduler(sleeps: Sleeps | None = None) -> Scheduler:
    return Scheduler(emit, sleep=sleeps or Sleeps(), clock=lambda: NOW)


class Failing:
    """A collect() that raises ``failures`` times, then returns its call number."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    def __call__(self) -> int:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"failure {self.calls}")
        return self.calls


@pytest.mark.gen_test
async def test_failures_back_off_exponentially_up_to_the_cap_and_reset_on_success():
    sleeps = Sleeps()
    sched = scheduler(sleeps)
    sched.add(PeriodicEmitter("flaky", 1.0, Failing(7)), "tests")
    await sched.start()
    await wait_until(lambda: len(sleeps.delays) >= 10, "ten scheduler rounds")
    await sched.stop()
    # 2**failures times the interval, capped at MAX_BACKOFF; the interval after a success.
    assert sleeps.delays[:10] == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 1.0, 1.0, 1.0]
    health = sched.sources["flaky"]
    assert (health.failures, health.consecutive_failures, health.healthy) == (7, 0, True)
    assert health.last_error == "RuntimeError: failure 7"
    assert health.last_run == NOW
    assert health.last_value >= 8


@pytest.mark.gen_test
async def test_a_source_slower_than_the_cap_backs_off_by_its_own_interval():
    sleeps = Sleeps()
    sched = scheduler(sleeps)
    sched.add(PeriodicEmitter("slow", 100.0, Failing(10**9)), "tests")
    await sched.start()
    await wait_until(lambda: len(sleeps.delays) >= 3, "three scheduler rounds")
    await sched.stop()
    assert sleeps.delays[:3] == [100.0, 100.0, 100.0]


@pytest.mark.gen_test
async def test_an_async_collect_that_overruns_times_out_and_the_next_run_starts_clean():
    never = asyncio.Event()
    calls = []

    async def collect():
        calls.append(1)
        if len(calls) == 1:
            await never.wait()
        return "fresh"

    sched = scheduler()
    sched.add(PeriodicEmitter("stuck", 5.0, collect, timeout=0.01), "tests")
    with pytest.raises(TimeoutError):
        await sched.run_once("stuck")
    assert sched.sources["stuck"].running is False
    assert await sched.run_once("stuck") == "fresh"


@pytest.mark.gen_test
async def test_a_hung_blocking_source_is_left_alone_until_it_returns():
    release = threading.Event()
    sched = scheduler()
    sched.add(PeriodicEmitter("hung", 5.0, lambda: release.wait(30) and 42, blocking=True,
                              timeout=0.01), "tests")  # fmt: skip
    try:
        with pytest.raises(TimeoutError):
            await sched.run_once("hung")
        health = sched.sources["hung"]
        assert health.running is True  # its thread still runs: no second one is started
        with pytest.raises(TimeoutError, match="previous run still in progress"):
            await sched.run_once("hung")
    finally:
        release.set()
    await wait_until(lambda: not health.running, "the hung thread to return")
    assert await sched.run_once("hung") == 42
    await sched.stop()


@pytest.mark.gen_test
async def test_a_timed_out_periodic_run_is_reported_as_timed_out():
    sleeps = Sleeps()
    never = asyncio.Event()

    async def collect():
        await never.wait()

    sched = scheduler(sleeps)
    sched.add(PeriodicEmitter("late", 0.5, collect, timeout=0.01), "tests")
    await sched.start()
    await wait_until(lambda: sched.sources["late"].failures >= 2, "two timeouts")
    await sched.stop()
    health = sched.sources["late"]
    assert health.last_error == "timed out"
    assert sleeps.delays[:2] == [1.0, 2.0]
    assert health.to_json() == {
        "name": "late",
        "plugin": "tests",
        "kind": "periodic",
        "healthy": False,
        "runs": 0,
        "failures": health.failures,
        "last_run": "2023-11-14T22:13:20.000Z",  # NOW, in RFC 3339 like every API time
        "last_error": "timed out",
    }


@pytest.mark.gen_test
async def test_an_event_source_whose_start_raises_is_unhealthy_and_the_rest_start():
    started = []

    def broken(emit):
        raise OSError("no such device")

    async def fine(emit):
        started.append(emit)

    sched = scheduler()
    sched.add(EventEmitter("broken", broken), "p1")
    sched.add(EventEmitter("fine", fine), "p2")
    await sched.start()
    assert len(started) == 1 and callable(started[0])  # the fine source got its emit
    broken_health, fine_health = sched.sources["broken"], sched.sources["fine"]
    assert (broken_health.healthy, broken_health.runs, broken_health.failures) == (False, 0, 1)
    assert broken_health.last_error == "OSError: no such device"
    assert (fine_health.healthy, fine_health.runs, fine_health.last_run) == (True, 1, NOW)
    await sched.stop()


@pytest.mark.gen_test
async def test_stop_records_a_raising_stop_and_abandons_one_that_overruns(caplog):
    never = asyncio.Event()
    stopped = []

    def raising_stop():
        raise ValueError("already gone")

    async def hanging_stop():
        await never.wait()

    async def start(emit):
        return None

    sched = scheduler()
    sched.add(EventEmitter("raises", start, raising_stop), "p")
    sched.add(EventEmitter("hangs", start, hanging_stop), "p")
    sched.add(EventEmitter("clean", start, lambda: stopped.append(True)), "p")
    sched.add(EventEmitter("no_stop", start), "p")
    await sched.start()
    with caplog.at_level(logging.WARNING, logger="quotaserver.realtime.emitters"):
        await sched.stop(timeout=0.05)
    assert stopped == [True]
    assert sched.sources["raises"].last_error == "ValueError: already gone"
    assert sched.sources["hangs"].healthy  # abandoned, not failed
    assert "did not stop within 0.05 s" in caplog.text


@pytest.mark.gen_test
async def test_stop_cancels_a_periodic_source_mid_run():
    entered = asyncio.Event()
    never = asyncio.Event()

    async def collect():
        entered.set()
        await never.wait()

    sched = scheduler()
    sched.add(PeriodicEmitter("busy", 5.0, collect, timeout=60), "tests")
    await sched.start()
    await asyncio.wait_for(entered.wait(), 10)
    await sched.stop()
    health = sched.sources["busy"]
    assert (health.runs, health.failures, health.running) == (0, 0, False)


@pytest.mark.gen_test
async def test_stats_fields_names_and_lookups():
    sched = scheduler()
    sched.add(PeriodicEmitter("temp", 5.0, lambda: 21.5, stats_field="temperature"), "p")
    sched.add(PeriodicEmitter("nothing", 5.0, lambda: None, stats_field="empty"), "p")
    sched.add(PeriodicEmitter("quiet", 5.0, lambda: 3), "p")
    assert sched.stats_fields() == {}  # nothing collected yet
    assert await sched.run_once("temp") == 21.5
    assert await sched.run_once("nothing") is None
    assert await sched.run_once("quiet") == 3
    assert sched.stats_fields() == {"temperature": 21.5}
    with pytest.raises(KeyError):
        await sched.run_once("absent")
    with pytest.raises(PluginError, match="duplicate emitter name 'temp'"):
        sched.add(PeriodicEmitter("temp", 1.0, lambda: 0), "other")
    assert sched.stats_fields() == {"temperature": 21.5}  # the refused one changed nothing


@pytest.mark.gen_test
async def test_maybe_await_takes_values_and_awaitables():
    async def three():
        return 3

    assert await maybe_await(3) == 3
    assert await maybe_await(three()) == 3


def test_a_long_error_is_cut_to_500_characters():
    sched = scheduler()
    health = SourceHealth("s", "p", "periodic")
    sched._failed(health, RuntimeError("x" * 1000))
    assert health.last_error == "RuntimeError: " + "x" * 486
