"""Failed authentication counted per client address, on every route.

Past ``auth.failed_attempts_per_ip`` failures within ``auth.failed_window`` seconds, every
request from that address is answered 429 with Retry-After *before* its credentials are
looked at, so guessing tokens (or login codes) is limited to that rate.

With a Redis backplane the failures are counted for the whole cluster as well
(:mod:`quotaserver.realtime.cluster_counts`): ``share`` counts each one there, and a cluster
count at the limit blocks the address here and, through ``on_block``, on every instance.
Without one, each process counts alone (a limit of N allows N per process).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

MAX_TRACKED_ADDRESSES = 10_000


class FailedAuthLimiter:
    def __init__(
        self, limit: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._windows: dict[str, tuple[float, int]] = {}  # address -> (window start, failures)
        #: ``share(address, window, done)`` counts a failure for the cluster and calls
        #: ``done(count, seconds_left)``; ``on_block(address, seconds)`` tells the others.
        self.share: Callable[[str, float, Callable[[int, float], None]], Any] | None = None
        self.on_block: Callable[[str, float], None] | None = None
        self._counting: dict[str, Any] = {}  # address -> the cluster count in flight

    def retry_after(self, address: str) -> int | None:
        """Seconds until ``address`` may try again, or None if it may now."""
        entry = self._windows.get(address)
        if entry is None:
            return None
        start, failures = entry
        left = start + self.window - self.clock()
        if left <= 0:
            del self._windows[address]
            return None
        return max(1, math.ceil(left)) if failures >= self.limit else None

    def failed(self, address: str) -> None:
        now = self.clock()
        start, failures = self._windows.get(address, (now, 0))
        if start + self.window <= now:
            start, failures = now, 0
        if address not in self._windows and len(self._windows) >= MAX_TRACKED_ADDRESSES:
            self._prune(now)
        self._windows[address] = (start, failures + 1)
        if self.share is not None:
            pending = self.share(
                address, self.window, lambda n, left: self._counted(address, n, left)
            )
            if pending is not None:
                self._counting[address] = pending
                pending.add_done_callback(lambda f: self._settled(address, f))

    def _settled(self, address: str, future: Any) -> None:
        if self._counting.get(address) is future:
            del self._counting[address]

    def counting(self, address: str) -> Any:
        """The cluster count of ``address``'s last failure while it is in flight (an
        awaitable that never raises), else None."""
        return self._counting.get(address)

    def block(self, address: str, seconds: float) -> None:
        """Refuse ``address`` for ``seconds`` (another instance saw it reach the limit)."""
        seconds = min(max(seconds, 0.0), self.window)
        self._windows[address] = (self.clock() - (self.window - seconds), self.limit)

    def _counted(self, address: str, count: int, left: float) -> None:
        if count < self.limit or left <= 0:
            return
        already = self.retry_after(address) is not None
        self.block(address, left)
        if not already and self.on_block is not None:
            self.on_block(address, left)

    def _prune(self, now: float) -> None:
        self._windows = {a: e for a, e in self._windows.items() if e[0] + self.window > now}
        while len(self._windows) >= MAX_TRACKED_ADDRESSES:  # all live: drop the oldest
            self._windows.pop(next(iter(self._windows)))
