"""Connection admission: attempts per IP (sliding window) and live connections per identity."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable


class ConnectionLimiter:
    def __init__(
        self,
        attempts_per_ip: int = 60,
        window: float = 10.0,
        per_identity: int = 50,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.attempts_per_ip = attempts_per_ip
        self.window = window
        self.per_identity = per_identity
        self.clock = clock
        self._attempts: dict[str, deque[float]] = defaultdict(deque)

    def refusal(self, ip: str, identity_key: str, live_for_identity: int) -> str | None:
        """Why a new stream connection is refused now, or None to admit it."""
        now = self.clock()
        attempts = self._attempts[ip]
        while attempts and attempts[0] <= now - self.window:
            attempts.popleft()
        if len(attempts) >= self.attempts_per_ip:
            return f"too many connection attempts from this address; retry in {self.window:g} s"
        attempts.append(now)
        if len(self._attempts) > 10_000:  # forget idle addresses
            for key in [k for k, v in self._attempts.items() if not v]:
                del self._attempts[key]
        if live_for_identity >= self.per_identity:
            return f"at most {self.per_identity} live connections per identity"
        return None
