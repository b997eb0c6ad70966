"""The database probe behind the health routes: answers from the last round trip, never waits.

A load balancer or Kubernetes asks for health every few seconds and gives up after one or
two. Awaiting a real query in the handler made ``/api/health`` take as long as the database
call timeout (12 s with the defaults) while PostgreSQL hung, and a health check that times
out reads as "down" for the wrong reason. So one probe (``SELECT 1`` through the writer path)
runs at a time in the background; the routes read its outcome:

- a probe that finished says whether the database answered;
- a probe still waiting after ``patience`` seconds says it does not (a database that cannot
  answer ``SELECT 1`` within a second is not ready, whatever the timeouts of real calls);
- :meth:`DatabaseProbe.fresh` lets ``/api/health`` wait for a new probe, but never longer
  than its budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .db import Store

#: Seconds an unanswered probe is given before the database counts as not answering.
PATIENCE = 1.0


class DatabaseProbe:
    """One background ``SELECT 1`` at a time and what the last one found."""

    def __init__(
        self,
        store: Store,
        track: Callable[[Any], asyncio.Future],
        patience: float = PATIENCE,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.patience = patience
        self._track = track
        self._clock = clock
        self._future: asyncio.Future | None = None
        self._started = 0.0
        self.finished_at: float | None = None  # clock() of the last finished probe
        self.ok = True  # until a probe says otherwise: the start-up migration just succeeded

    def start(self) -> asyncio.Future:
        """The probe in flight, or a new one (never two at once on a hung server)."""
        if self._future is None or self._future.done():
            self._started = self._clock()
            self._future = self._track(self._probe())
        return self._future

    async def _probe(self) -> None:
        ok = await self.store.check()
        self.ok, self.finished_at = ok, self._clock()

    @property
    def waiting(self) -> float:
        """Seconds the probe in flight has been waiting (0 when none is)."""
        if self._future is None or self._future.done():
            return 0.0
        return self._clock() - self._started

    @property
    def answering(self) -> bool:
        """The database answers: the last probe succeeded and none has waited too long."""
        return self.ok and self.store.available and self.waiting <= self.patience

    def refresh(self, older_than: float) -> None:
        """Start a probe if the last one finished more than ``older_than`` seconds ago."""
        if self.finished_at is None or self._clock() - self.finished_at > older_than:
            self.start()

    async def fresh(self, budget: float) -> bool:
        """Wait up to ``budget`` seconds for a new probe; then :attr:`answering`."""
        future = self.start()
        with contextlib.suppress(TimeoutError):  # not answered in time: it says so
            await asyncio.wait_for(asyncio.shield(future), budget)
        return self.answering
