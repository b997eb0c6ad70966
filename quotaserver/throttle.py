"""Throttle factor from load, with hysteresis and a hold time.

The factor is a number in [0, 1] that every quota decision carries: 1 means "go ahead",
lower values ask callers to slow down, and 0 makes the server refuse consumes with
``system_overloaded``. It is the lower of the CPU and the memory band factors.

A noisy load must not flap the factor (each change is a durable ``throttle`` event and a
log line). So:

- **hysteresis**: a band is entered as soon as the load reaches its threshold, but left
  only once the load is ``hysteresis`` percentage points below it;
- **hold**: a different factor must be wanted by every sample for ``hold_seconds``
  before it takes effect (then the latest wanted band applies).

Where the load comes from is ``throttle.source``: ``host`` (the whole machine), ``process``
(this server's own CPU, as a share of one core, and its resident memory) or ``off`` (the
factor stays 1). The load is sampled elsewhere (the system-metrics plugin, off the IOLoop)
and handed in with :meth:`SystemLoad.update`; tests inject load the same way.

The sampler owns the load history too: every real sample handed to :meth:`SystemLoad.update`
is kept in :attr:`SystemLoad.history` (a :class:`LoadRing` of the last 15 minutes, in
memory), which ``GET /api/admin/quotas/history`` reads for the dashboard's load chart.
Nothing is recorded while nothing measures.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import Config

SOURCES = ("host", "process", "off")
LOAD_WINDOW = 15 * 60.0  # seconds of load samples kept


class Bands:
    """Thresholds in ascending order; a *level* is how many of them a value reaches."""

    def __init__(self, bands: list[list[float]]):
        ordered = sorted(bands)  # by threshold (config refuses a threshold twice)
        self.thresholds = [float(t) for t, _ in ordered]
        self.factors = [1.0] + [float(f) for _, f in ordered]

    def level(self, value: float) -> int:
        return bisect_right(self.thresholds, value)

    def next_level(self, current: int, value: float, margin: float) -> int:
        """Up at once; down only as far as ``value + margin`` allows (hysteresis)."""
        return max(self.level(value), min(current, self.level(value + margin)))

    def factor(self, level: int) -> float:
        return self.factors[level]


@dataclass(frozen=True, slots=True)
class LoadSample:
    cpu_percent: float
    memory_percent: float
    factor: float
    sampled_at: float  # time.time()

    @property
    def throttle_active(self) -> bool:
        return self.factor < 1.0


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


class SystemLoad:
    """The latest load sample, the throttle factor derived from it, and the recent history."""

    def __init__(
        self,
        cpu_bands: list[list[float]],
        memory_bands: list[list[float]],
        *,
        hysteresis: float = 0.0,
        hold_seconds: float = 0.0,
        source: str = "host",
    ):
        self.cpu_bands = Bands(cpu_bands)
        self.memory_bands = Bands(memory_bands)
        self.hysteresis = hysteresis
        self.hold_seconds = hold_seconds
        self.source = source
        self.current = LoadSample(0.0, 0.0, 1.0, 0.0)
        self.history = LoadRing()
        self._levels = (0, 0)  # (cpu, memory) levels in effect
        # A wanted change not yet held: (direction, monotonic start), direction 1 for a
        # higher factor and -1 for a lower one.
        self._pending: tuple[int, float] | None = None

    @classmethod
    def from_config(cls, config: Config) -> SystemLoad:
        return cls(
            config["throttle.cpu_bands"],
            config["throttle.memory_bands"],
            hysteresis=config["throttle.hysteresis"],
            hold_seconds=config["throttle.hold_seconds"],
            source=config["throttle.source"],
        )

    @property
    def factor(self) -> float:
        return self.current.factor

    @property
    def refusing(self) -> str:
        """Which load refuses consumes now (``cpu`` or ``memory``), for the refusal counter;
        ``none`` while the factor is above 0."""
        if self.current.factor > 0.0:
            return "none"
        return "cpu" if self.cpu_bands.factor(self._levels[0]) <= 0.0 else "memory"

    def _factor_of(self, levels: tuple[int, int]) -> float:
        return min(self.cpu_bands.factor(levels[0]), self.memory_bands.factor(levels[1]))

    def update(
        self, cpu_percent: float, memory_percent: float, now: float | None = None
    ) -> tuple[LoadSample, bool]:
        """Record a sample; return it and whether the factor changed (a change that held)."""
        now = time.monotonic() if now is None else now
        factor = self.current.factor
        if self.source == "off":
            wanted = (0, 0)
        else:
            wanted = (
                self.cpu_bands.next_level(self._levels[0], cpu_percent, self.hysteresis),
                self.memory_bands.next_level(self._levels[1], memory_percent, self.hysteresis),
            )
        wanted_factor = self._factor_of(wanted)
        direction = (wanted_factor > factor) - (wanted_factor < factor)
        if direction == 0:
            self._levels = wanted  # same factor: levels may move without an event
            self._pending = None
        else:
            if self._pending is None or self._pending[0] != direction:
                self._pending = (direction, now)  # a new wish: its hold starts now
            if now - self._pending[1] >= self.hold_seconds:
                self._levels, factor = wanted, wanted_factor
                self._pending = None
        changed = factor != self.current.factor
        self.current = LoadSample(
            round(cpu_percent, 1), round(memory_percent, 1), factor, time.time()
        )
        self.history.record(self.current)
        return self.current, changed
