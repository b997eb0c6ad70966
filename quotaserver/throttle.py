"""Throttle factor from system load.

The factor is a number in [0, 1] that every quota decision carries: 1 means "go ahead",
lower values ask callers to slow down, and 0 makes the server refuse consumes with
``system_overloaded``. It is the lower of the CPU and the memory band factors.

The load itself is sampled elsewhere (the system-metrics plugin, off the IOLoop) and
handed in with :meth:`SystemLoad.update`; tests inject load the same way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


def band_factor(value: float, bands: list[list[float]]) -> float:
    """Factor of the highest band whose threshold ``value`` reaches (1.0 below all)."""
    for threshold, factor in sorted(bands, key=lambda b: b[0], reverse=True):
        if value >= threshold:
            return float(factor)
    return 1.0


@dataclass(frozen=True, slots=True)
class LoadSample:
    cpu_percent: float
    memory_percent: float
    factor: float
    sampled_at: float  # time.time()

    @property
    def throttle_active(self) -> bool:
        return self.factor < 1.0


class SystemLoad:
    """The latest load sample and the throttle factor derived from it."""

    def __init__(self, cpu_bands: list[list[float]], memory_bands: list[list[float]]):
        self.cpu_bands = cpu_bands
        self.memory_bands = memory_bands
        self.current = LoadSample(0.0, 0.0, 1.0, 0.0)

    @property
    def factor(self) -> float:
        return self.current.factor

    def update(self, cpu_percent: float, memory_percent: float) -> tuple[LoadSample, bool]:
        """Record a sample; return it and whether the factor changed band."""
        factor = min(
            band_factor(cpu_percent, self.cpu_bands),
            band_factor(memory_percent, self.memory_bands),
        )
        changed = factor != self.current.factor
        self.current = LoadSample(
            round(cpu_percent, 1), round(memory_percent, 1), factor, time.time()
        )
        return self.current, changed
