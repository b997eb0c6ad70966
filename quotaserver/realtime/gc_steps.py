"""Keep long-lived connections out of full garbage collections, one step at a time.

A live connection is a few dozen objects (handler, stream, buffers, client state) that live
for hours. CPython's full collection walks every tracked object of the oldest generation,
so at 10,000 connections it walked half a million objects and paused the loop for 35-430 ms
(docs/benchmarks.md): one such pause during a broadcast decides its p99.

``gc.freeze()`` moves every tracked object to the permanent generation, which collections
skip, and costs no more than moving two list heads. Start-up freezes what it built;
:class:`GcSteps` (ticked twice a second) freezes again each time the number of connections
has grown by a step (10 % and at least ``min_step``) since the last freeze, so accepted
connections leave the oldest generation within half a second, before the next full
collection has much to walk. Freezing has a price: frozen objects that become garbage in a
reference cycle are not reclaimed while frozen (objects freed by reference counting are
freed as usual). So when connections have fallen by a quarter since the last freeze, it
unfreezes, collects once (one pause, reclaiming what closed) and freezes what is left.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class GcSteps:
    """Call :meth:`tick` periodically; ``count`` returns the live connections now."""

    def __init__(self, count: Callable[[], int], *, min_step: int = 100, grow: float = 0.1) -> None:
        self.count = count
        self.min_step = min_step
        self.grow = grow
        self.frozen_at = count()  # connections at the last freeze (start-up's)
        self.freezes = 0
        self.thaws = 0

    def tick(self) -> None:
        live = self.count()
        step = max(self.min_step, int(self.frozen_at * self.grow))
        if live >= self.frozen_at + step:
            gc.freeze()
            self.freezes += 1
        elif live <= self.frozen_at - max(self.min_step, self.frozen_at // 4):
            # Closed connections may hold frozen cycles: reclaim them once, then refreeze.
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self.thaws += 1
        else:
            return
        log.debug("gc: %d live connections, %d objects frozen", live, gc.get_freeze_count())
        self.frozen_at = live
