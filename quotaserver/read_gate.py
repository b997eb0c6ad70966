"""Admin reads take turns, and leave the process room for quota decisions.

An admin list's Python work (rows to JSON) holds the GIL that the event loop and the
consume writer need. Ten dashboards paging continuously used to run that work on every
reader thread at once and saturate the process: consume p99 grew 3.5x (docs/benchmarks.md,
"Scale of data"). The gate lets one admin read run at a time and, after a read that took
``t``, keeps the next one waiting another ``rest x t``: admin reads use at most
``1 / (1 + rest)`` of one thread however many admins page, and a lone read is never
delayed (only the one after it waits; a failed read rests none, and no rest exceeds
``MAX_REST``). Every admin page read passes through it (the lists, the user page, the
charts' history); the stream's replay and the consume path do not. The application owns
one gate (``QuotaApp.read_gate``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

CONCURRENT = 1  # admin reads running at once
REST = 1.0  # after a read of t seconds, the next one starts t x REST later
MAX_REST = 0.05  # seconds: a slow read (or a failing database) never parks the admin pages


class GateTimeout(Exception):
    """A read's turn did not come in time (a read ahead of it hangs)."""


class ReadGate:
    def __init__(self, concurrent: int = CONCURRENT, rest: float = REST):
        self.rest = rest
        self._slots = asyncio.Semaphore(concurrent)

    async def run(self, read: Callable[[], Awaitable[T]], wait: float | None = None) -> T:
        """``read()`` when its turn comes; :class:`GateTimeout` if it has not come within
        ``wait`` seconds (a read ahead of it hangs: the caller answers instead of queueing)."""
        try:
            async with asyncio.timeout(wait):
                await self._slots.acquire()
        except TimeoutError:
            raise GateTimeout(f"no turn within {wait:g} s") from None
        started = time.perf_counter()
        try:
            result = await read()
        except BaseException:
            self._slots.release()
            raise
        delay = min((time.perf_counter() - started) * self.rest, MAX_REST)
        asyncio.get_running_loop().call_later(delay, self._slots.release)
        return result
