"""The load chart's history in the database, so that a restart does not blank it.

The throttle keeps the last 15 minutes of load samples in memory (:class:`throttle.LoadRing`).
:class:`LoadLog` writes the samples it has not written yet as rows of this instance
(``load_point``), in one statement every :attr:`LoadLog.interval` seconds and at shutdown,
and deletes the instance's rows older than the ring's window in the same transaction.
:meth:`LoadLog.since` answers the history API: the rows older than the ring's first sample
(those of the process before a restart), then the ring. A process killed without a shutdown
loses at most its last interval of samples; nothing that decides a quota depends on them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from tornado.ioloop import PeriodicCallback

from .db import Store
from .models import LoadPoint
from .throttle import LoadRing, LoadSample

log = logging.getLogger(__name__)


class LoadLog:
    """Writes this instance's load samples and reads them back for the history API."""

    interval = 5.0  # seconds of samples a kill without a shutdown may lose

    def __init__(
        self,
        store: Store,
        ring: LoadRing,
        instance: Callable[[], str],
        clock: Callable[[], float] = time.time,
    ):
        self.store = store
        self.ring = ring
        self.instance = instance  # the name is known once the server listens
        self.clock = clock
        self.written_to = 0.0  # sampled_at of the last sample written
        self._timer: PeriodicCallback | None = None

    def start(self) -> None:
        self._timer = PeriodicCallback(self._tick, self.interval * 1000)
        self._timer.start()

    async def close(self) -> None:
        """Stop the timer and write what is left (at shutdown, before the store closes)."""
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        await self._tick()

    async def _tick(self) -> None:
        try:
            await self.flush()
        except Exception as exc:  # noqa: BLE001 - the samples stay in the ring: retried
            log.warning("load history not written, retrying: %s", exc)

    async def flush(self) -> None:
        """Write the samples taken since the last write (none: nothing to do)."""
        fresh = [s for s in self.ring.samples if s.sampled_at > self.written_to]
        if not fresh:
            return
        instance, cutoff = self.instance(), self.clock() - self.ring.window
        await self.store.run(_write, instance, fresh, cutoff)
        self.written_to = fresh[-1].sampled_at

    async def since(self, seconds: float) -> list[dict[str, Any]]:
        """The samples of the last ``seconds`` (at most the ring's window), oldest first."""
        now = self.clock()
        kept = self.ring.since(seconds, now)
        before = kept[0]["t"] if kept else now + 1.0
        earlier = await self.store.read(_read, self.instance(), now - seconds, before)
        return earlier + kept


def _write(instance: str, samples: list[LoadSample], cutoff: float) -> None:
    LoadPoint.insert_many(
        [
            {
                "instance": instance,
                "t": s.sampled_at,
                "cpu_percent": s.cpu_percent,
                "memory_percent": s.memory_percent,
                "throttle_factor": s.factor,
            }
            for s in samples
        ]
    ).on_conflict_ignore().execute()
    LoadPoint.delete().where((LoadPoint.instance == instance) & (LoadPoint.t < cutoff)).execute()


def _read(instance: str, start: float, before: float) -> list[dict[str, Any]]:
    rows = (
        LoadPoint.select()
        .where((LoadPoint.instance == instance) & (LoadPoint.t >= start) & (LoadPoint.t < before))
        .order_by(LoadPoint.t)
    )
    return [
        {
            "t": round(r.t, 3),
            "cpu_percent": r.cpu_percent,
            "memory_percent": r.memory_percent,
            "throttle_factor": r.throttle_factor,
        }
        for r in rows
    ]
