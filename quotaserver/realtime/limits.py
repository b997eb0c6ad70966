"""Connection admission for the live streams (WebSocket and SSE).

Two independent limits, both decided before a connection is admitted:

* attempts per client address in a sliding window: counted for every handshake,
  including ones that fail authentication, so a client cannot hammer the handshake
  (or guess credentials) faster than the window allows;
* live connections per identity: one leaked or misbehaving token cannot take every
  slot of the hub.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping
from typing import Any

MAX_TRACKED_ADDRESSES = 10_000


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

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ConnectionLimiter:
        return cls(
            attempts_per_ip=config["auth.connect_attempts_per_ip"],
            window=config["auth.connect_window"],
            per_identity=config["auth.max_connections_per_identity"],
        )

    def attempt(self, ip: str) -> int | None:
        """Count one connection attempt from ``ip``.

        Returns None to go on, or the whole seconds to wait (``Retry-After``) when the
        address has used up its attempts; a refused attempt is not counted, so a client
        that waits as told gets in.
        """
        now = self.clock()
        attempts = self._attempts[ip]
        while attempts and attempts[0] <= now - self.window:
            attempts.popleft()
        if len(attempts) >= self.attempts_per_ip:
            return max(1, math.ceil(attempts[0] + self.window - now))
        attempts.append(now)
        if len(self._attempts) > MAX_TRACKED_ADDRESSES:
            self._forget_idle(now)
        return None

    def identity_refusal(self, live: int) -> str | None:
        """Why one more live connection is refused for an identity holding ``live``."""
        if live >= self.per_identity:
            return f"at most {self.per_identity} live connections per identity"
        return None

    def _forget_idle(self, now: float) -> None:
        # Bounded memory under a spray of addresses: drop those with no recent attempt.
        for key in [k for k, v in self._attempts.items() if not v or v[-1] <= now - self.window]:
            del self._attempts[key]
