"""One-time login codes: how the start-up link signs a browser in without a token in a URL.

A code stands for a token (by its digest) for a few minutes and works once in total, on any
worker or instance: codes are rows of the shared database (only their SHA-256), and
redeeming one deletes its row, so two processes racing for one code cannot both win. The
link printed at start-up carries the code in the fragment (``/login#code=...``), which
browsers never send to a server, a proxy's access log or a Referer; the login page POSTs it
with its XSRF token.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .models import LoginCode

if TYPE_CHECKING:
    from .db import Store


class LoginCodes:
    def __init__(self, lifetime: float, clock: Callable[[], float] = time.time):
        self.lifetime = lifetime
        self.clock = clock  # wall clock: every process of the cluster compares with it
        self._store: Store | None = None

    def attach(self, store: Store) -> None:
        self._store = store

    async def issue(self, token_digest: str) -> str:
        """Store a new code for the token with this digest; return it."""
        code = secrets.token_urlsafe(24)
        now = self.clock()
        await self._require_store().run(
            _insert, _key(code), token_digest, int(now + self.lifetime), int(now)
        )
        return code

    async def redeem(self, code: str) -> str | None:
        """The token digest of a valid code, which is spent by this call; else None."""
        return await self._require_store().run(_redeem, _key(code), int(self.clock()))

    def _require_store(self) -> Store:
        if self._store is None:
            raise RuntimeError("Auth.load() has not run")
        return self._store


# -- storage (runs on a database worker thread) ------------------------------------------
def _insert(key: str, token_digest: str, expires: int, now: int) -> None:
    LoginCode.delete().where(LoginCode.expires_at <= now).execute()
    LoginCode.insert(code_hash=key, token_digest=token_digest, expires_at=expires).on_conflict(
        conflict_target=[LoginCode.code_hash], update={LoginCode.expires_at: expires}
    ).execute()


def _redeem(key: str, now: int) -> str | None:
    row = LoginCode.get_or_none(LoginCode.code_hash == key)
    if row is None:
        return None
    # Whoever deletes the row has spent the code: a concurrent redeemer deletes nothing.
    spent = LoginCode.delete().where(LoginCode.code_hash == key).execute()
    return row.token_digest if spent == 1 and row.expires_at > now else None


def _key(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest()
