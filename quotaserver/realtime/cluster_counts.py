"""Limits that protect the cluster, counted for the cluster (through the Redis backplane).

Two things an attacker would otherwise multiply by the number of processes:

- **failed authentications per address**: each failure is one atomic Redis operation (a
  script: ``INCR`` and, for the first, ``PEXPIRE``), fired after the failure is answered,
  so no request ever waits on Redis; an instance whose count reaches the limit blocks the
  address itself and tells the others through the backplane's control channel;
- **live connections per identity**: every ``interval`` each instance writes its own counts
  to a hash that expires after three intervals and reads the others' (an instance that dies
  stops counting within that time); an admission adds the others' last counts to its own.

Bounds: a failure is counted cluster-wide within one Redis round trip (so at most one more
attempt per other instance gets through while that is under way); connection counts are
at most ``interval`` old. While Redis is unreachable both stay per process, the documented
fallback (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# INCR a window counter; the first increment starts the window. Returns {count, ms left}.
_COUNT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('PTTL', KEYS[1])}
"""


class ClusterCounts:
    """Counters shared by every instance on one Redis (``client`` makes a redis.asyncio
    client; ``prefix`` is the backplane channel, so deployments sharing a Redis stay apart)."""

    def __init__(
        self,
        client: Callable[[], Any],
        prefix: str,
        origin: str,
        *,
        interval: float = 1.0,
        timeout: float = 0.5,
    ):
        self._make_client = client
        self.prefix = prefix
        self.origin = origin
        self.interval = interval
        self.timeout = timeout
        self.remote_connections: Counter[str] = Counter()  # identity -> others' live count
        self.errors = 0
        self._client: Any = None
        self._task: asyncio.Task | None = None
        self._pending: set[asyncio.Future] = set()

    def start(self, local_connections: Callable[[], Counter[str]]) -> None:
        self._client = self._make_client()
        self._task = asyncio.ensure_future(self._share_connections(local_connections))

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._pending) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.delete(self._connections_key(self.origin))
            with contextlib.suppress(Exception):
                await self._client.aclose()

    # -- failed authentications ------------------------------------------------------------
    def count_failure(
        self, address: str, window: float, done: Callable[[int, float], None]
    ) -> asyncio.Future | None:
        """Count one failure of ``address`` for the cluster; ``done(count, seconds_left)``
        runs with the cluster's count (not at all if Redis does not answer within
        ``timeout``). Returns the count in flight (it never raises), if one was sent."""
        if self._client is None:
            return None
        future = asyncio.ensure_future(self._count(f"{self.prefix}:failed:{address}", window))
        self._pending.add(future)

        def finished(f: asyncio.Future) -> None:
            self._pending.discard(f)
            if not f.cancelled() and f.exception() is None and f.result() is not None:
                done(*f.result())

        future.add_done_callback(finished)
        return future

    async def _count(self, key: str, window: float) -> tuple[int, float] | None:
        try:
            async with asyncio.timeout(self.timeout):
                count, left_ms = await self._client.eval(_COUNT, 1, key, int(window * 1000))
            return int(count), max(0.0, int(left_ms) / 1000)
        except Exception as exc:  # noqa: BLE001 - Redis down: this process counts alone
            self._error("count a failed authentication", exc)
            return None

    # -- live connections per identity -----------------------------------------------------
    def _connections_key(self, origin: str) -> str:
        return f"{self.prefix}:connections:{origin}"

    async def _share_connections(self, local: Callable[[], Counter[str]]) -> None:
        members = f"{self.prefix}:instances"
        while True:
            try:
                async with asyncio.timeout(self.timeout + self.interval):
                    await self._exchange(members, local())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep the last counts; next round
                self._error("share connection counts", exc)
            await asyncio.sleep(self.interval)

    async def _exchange(self, members: str, mine: Counter[str]) -> None:
        now = time.time()
        ttl = int(self.interval * 3000)
        own = self._connections_key(self.origin)
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(own)
        if mine:
            pipe.hset(own, mapping={k: v for k, v in mine.items() if v > 0})
            pipe.pexpire(own, ttl)
        pipe.zadd(members, {self.origin: now})
        pipe.zremrangebyscore(members, "-inf", now - ttl / 1000)
        pipe.zrange(members, 0, -1)
        others = [m.decode() for m in (await pipe.execute())[-1] if m.decode() != self.origin]
        total: Counter[str] = Counter()
        if others:
            reader = self._client.pipeline(transaction=False)
            for origin in others:
                reader.hgetall(self._connections_key(origin))
            for counts in await reader.execute():
                for identity, value in counts.items():
                    total[identity.decode()] += int(value)
        self.remote_connections = total

    def _error(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        if self.errors == 1 or self.errors % 100 == 0:
            log.warning("cluster counts: cannot %s (%d so far): %s", what, self.errors, exc)
