"""Per-minute admitted commands summed in memory and flushed (PostgreSQL).

Every consume of a minute adds to the same ``Activity`` row. On PostgreSQL, writing it in
each consume's transaction makes every consume wait for the row lock of the one before it
until its COMMIT, so the consumes of all workers and instances run one at a time. Instead
each process sums the commands it admitted per minute (after their COMMIT, on the IOLoop)
and adds them to the rows with one additive upsert every :attr:`ActivityBuffer.interval`
seconds, before an activity read of this process, and on shutdown. Another process's
admitted commands reach the charts up to one interval late; a process killed without a
shutdown loses at most its last interval of chart figures (the counters, which decide
quotas, are never buffered). SQLite needs none of this: its group commit already sums
the activity of the units it commits together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tornado.ioloop import PeriodicCallback

from .db import Store

log = logging.getLogger(__name__)


class ActivityBuffer:
    """Admitted commands per minute not yet written, and their periodic flush."""

    interval = 1.0  # seconds: the staleness bound of another process's chart figures

    def __init__(self, store: Store, write: Callable[[dict[int, tuple[int, int]]], None]):
        self.store = store
        self.write = write  # on a DB thread: adds {minute: (commands, violations)}
        self.pending: dict[int, int] = {}
        self._timer: PeriodicCallback | None = None

    def add(self, minute: int, commands: int) -> None:
        """Count ``commands`` admitted in ``minute`` (IOLoop thread)."""
        self.pending[minute] = self.pending.get(minute, 0) + commands
        if self._timer is None:
            self._timer = PeriodicCallback(self._tick, self.interval * 1000)
            self._timer.start()

    async def _tick(self) -> None:
        try:
            await self.flush()
        except Exception as exc:  # noqa: BLE001 - kept and retried at the next tick
            log.warning("activity flush failed, retrying: %s", exc)

    async def flush(self) -> None:
        """Write the pending totals; on failure they are kept for the next flush."""
        if not self.pending:
            return
        taken, self.pending = self.pending, {}
        try:
            await self.store.run(self.write, {m: (c, 0) for m, c in taken.items()})
        except BaseException:
            for minute, commands in taken.items():
                self.pending[minute] = self.pending.get(minute, 0) + commands
            raise

    async def close(self) -> None:
        """Stop the timer and write what is pending (shutdown)."""
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        try:
            await self.flush()
        except Exception as exc:  # noqa: BLE001 - the database is gone: figures lost
            log.warning("activity not flushed at shutdown: %s", exc)
