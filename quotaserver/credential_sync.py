"""Credentials as cluster state: one version in the database, a poll, and a nudge.

Every process (a worker, an instance on another machine) keeps the credentials in memory,
so authenticating a request is a dictionary lookup: no database or Redis round trip on the
hot path. What keeps those copies true is one number, ``auth_state.version``:

- every token creation, revocation and logout increments it *in its own transaction*, as
  its first statement (on PostgreSQL that row lock also serialises the cluster's security
  writes, so two revocations cannot both pass the last-admin check);
- every process reads it every ``auth.sync_interval`` (1 s by default) and, when it differs
  from the version it loaded, reloads tokens and revoked sessions in full and closes the
  live streams whose credentials are gone (1008);
- with a backplane, the writer also nudges the other instances after COMMIT, so they
  re-read at once instead of at the next poll.

Bounds: a change holds everywhere within one poll interval plus a read (the nudge makes it
milliseconds); a lost nudge costs at most the poll interval; a database that cannot be read
keeps the last loaded state and is retried every interval (a revoked credential can outlive
its revocation only while the database is unreachable, and then nothing is admitted that
writes anyway). The writes themselves never trust memory: the last-admin rule and the
actor's own validity are checked in the database, in the transaction of the change.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from tornado.ioloop import PeriodicCallback

from .models import AuthState

log = logging.getLogger("quotaserver.auth")


def bump_version() -> None:
    """Increment the credentials version (call first inside a security write's transaction)."""
    AuthState.update(version=AuthState.version + 1).where(AuthState.id == 1).execute()


def read_version() -> int:
    row = AuthState.get_or_none(AuthState.id == 1)
    return row.version if row is not None else 0


class CredentialSync:
    """Polls the credentials version and calls ``reload`` when it moved.

    ``reload`` returns the version it loaded; ``poke`` (a nudge from another instance, or a
    local change) checks at once. Checks never overlap: a poke during a check runs one more
    check after it, so a change committed while a check was reading is never missed.
    """

    def __init__(
        self,
        read: Callable[[], Awaitable[int]],
        reload: Callable[[], Awaitable[int]],
        loaded: int,
        interval: float = 1.0,
    ):
        self._read = read
        self._reload = reload
        self.version = loaded
        self.interval = interval
        self.reloads = 0
        self.failures = 0
        self._task: asyncio.Task | None = None
        self._again = False
        self._timer: PeriodicCallback | None = None
        self._failing = False

    def start(self) -> None:
        self._timer = PeriodicCallback(self.poke, self.interval * 1000)
        self._timer.start()

    async def stop(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def poke(self) -> None:
        """Check the version now (or right after the check in progress)."""
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.ensure_future(self._check())

    async def _check(self) -> None:
        while True:
            self._again = False
            try:
                if await self._read() != self.version:
                    self.version = await self._reload()
                    self.reloads += 1
                if self._failing:
                    log.info("credentials: the database answers again")
                self._failing = False
            except Exception as exc:  # noqa: BLE001 - keep the last state, retry next tick
                self.failures += 1
                if not self._failing:
                    log.warning("credentials: cannot read the database: %s", exc)
                self._failing = True
            if not self._again:
                return
