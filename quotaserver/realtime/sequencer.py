"""Durable events to the hub once each and in seq order, from any number of sources.

Events reach an instance from its own commits, from the backplane and from the event log,
in any order and possibly twice. The sequencer keeps ``head``: every seq up to it has been
delivered or is known never to exist. An event at ``head + 1`` goes out at once (then any
held successors); a later one is held while the gap is resolved: first ``hold`` seconds for
the missing event to arrive by itself (two instances publishing at once), then from the
event log.

Resolving a gap from the log is exact because event ids *commit in order*
(:func:`quotaserver.events.append_event` holds a lock from the id's allocation to COMMIT on
PostgreSQL; SQLite has one writer): once an id is visible, every lower id is committed or
rolled back for good. So the log read after a visible higher id returns every lower event
that will ever exist, and an id it lacks is a hole to skip, not an event to wait for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from .messages import Message

log = logging.getLogger(__name__)

Fetch = Callable[[int, int], Awaitable[list[Message]]]


class Sequencer:
    """Orders durable events by seq before ``deliver`` sees them."""

    def __init__(
        self,
        deliver: Callable[[Message], None],
        fetch: Fetch,
        *,
        hold: float = 0.05,
        batch: int = 1000,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.deliver = deliver
        self.fetch = fetch
        self.hold = hold
        self.batch = batch
        self._sleep = sleep  # the hold and the retry back-off (tests record them)
        self.head = 0
        self.pending: dict[int, Message] = {}
        self.backfilled = 0  # events that came from the event log, not live
        self._resolver: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._stopped = False

    def offer(self, message: Message) -> bool:
        """Take a committed durable event; False if it was already delivered or held."""
        seq = message.seq
        assert seq is not None
        if seq <= self.head or seq in self.pending:
            return False
        if seq == self.head + 1:
            self._emit(message)
            self._drain()
        else:
            self.pending[seq] = message
            self._resolve_soon()
        return True

    async def sync(self) -> None:
        """Deliver whatever the event log holds beyond ``head`` (after a reconnection, a
        periodic check, or a cursor from another instance)."""
        async with self._lock:
            while True:
                fetched = await self.fetch(self.head, self.batch)
                self._apply(fetched)
                if len(fetched) < self.batch:
                    return

    async def settled(self) -> None:
        """Wait until no gap is being resolved (tests, shutdown)."""
        while self._resolver is not None and not self._resolver.done():
            await asyncio.shield(self._resolver)

    async def stop(self) -> None:
        self._stopped = True  # late arrivals are held, no longer resolved
        if self._resolver is not None:
            self._resolver.cancel()
            await asyncio.gather(self._resolver, return_exceptions=True)
            self._resolver = None

    # -- internals ---------------------------------------------------------------------
    def _emit(self, message: Message) -> None:
        self.head = message.seq  # type: ignore[assignment]
        self.deliver(message)

    def _drain(self) -> None:
        while (message := self.pending.pop(self.head + 1, None)) is not None:
            self._emit(message)
        # Anything held at or below head was resolved by a log read meanwhile.
        for seq in [s for s in self.pending if s <= self.head]:
            del self.pending[seq]

    def _apply(self, fetched: list[Message]) -> None:
        """Deliver a log read: every event up to its last id that will ever exist."""
        if not fetched:
            return
        last: int = fetched[-1].seq  # type: ignore[assignment]
        ready = {m.seq: m for m in fetched if m.seq > self.head}  # type: ignore[operator]
        self.backfilled += sum(1 for seq in ready if seq not in self.pending)
        for seq in [s for s in self.pending if s <= last]:
            ready[seq] = self.pending.pop(seq)
        for seq in sorted(ready):
            self._emit(ready[seq])
        self.head = max(self.head, last)
        self._drain()

    def _resolve_soon(self) -> None:
        if self._stopped:
            return
        if self._resolver is None or self._resolver.done():
            self._resolver = asyncio.get_running_loop().create_task(self._resolve())

    async def _resolve(self) -> None:
        await self._sleep(self.hold)
        attempt = 0
        # Whatever is still held lies beyond a gap: offer() and _drain() deliver the rest.
        while self.pending:
            try:
                async with self._lock:
                    target = max(self.pending)
                    limit = min(self.batch, target - self.head)
                    self._apply(await self.fetch(self.head, limit))
                attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the database is down: keep holding, retry
                log.warning("cannot read the event log to fill a gap; retrying", exc_info=True)
                await self._sleep(min(5.0, 0.1 * 2**attempt))
                attempt += 1
        self._drain()
