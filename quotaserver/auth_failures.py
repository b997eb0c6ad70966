"""Failed authentication counted per client address, on every route.

Past ``auth.failed_attempts_per_ip`` failures within ``auth.failed_window`` seconds, every
request from that address is answered 429 with Retry-After *before* its credentials are
looked at, so guessing tokens (or login codes) is limited to that rate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

MAX_TRACKED_ADDRESSES = 10_000


class FailedAuthLimiter:
    def __init__(
        self, limit: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._windows: dict[str, tuple[float, int]] = {}  # address -> (window start, failures)

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

    def _prune(self, now: float) -> None:
        self._windows = {a: e for a, e in self._windows.items() if e[0] + self.window > now}
        while len(self._windows) >= MAX_TRACKED_ADDRESSES:  # all live: drop the oldest
            self._windows.pop(next(iter(self._windows)))
