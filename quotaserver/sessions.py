"""Browser sessions: signed cookies that name the token they came from, and logout.

A session names its token (by token id), so revoking a token ends its sessions; logging out
records the session as revoked (in the database too, so a restart does not bring it back,
and every other process reloads it: :mod:`quotaserver.credential_sync`), written and
audited first, refused in memory after the COMMIT. The app closes the live connections of a
revoked identity with 1008.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .audit import record_audit
from .credential_sync import bump_version
from .models import RevokedSession, aware
from .tokens import Identity, TokenRegistry, write_security
from .windows import utc_now

if TYPE_CHECKING:
    from .db import Store

SESSION_COOKIE = "qs_session"


class Sessions:
    """Issue and check session payloads; remember logged-out sessions until they expire."""

    def __init__(self, registry: TokenRegistry, lifetime: float):
        self.registry = registry
        self.lifetime = lifetime
        self.revoked: dict[str, float] = {}  # session id -> expiry (epoch s)
        self._store: Store | None = None
        self._clock: Callable[[], datetime] = utc_now

    async def load(self, store: Store, clock: Callable[[], datetime] = utc_now) -> None:
        self._store, self._clock = store, clock
        self.revoked = await store.run(_load_revoked, time.time())

    def new_session(self, identity: Identity, xsrf: str) -> dict[str, Any]:
        """The payload of a new session cookie; ``xsrf`` (the sign-in form's XSRF token,
        hex) is bound to it: a state-changing request of this session must carry it. The
        name and role are not in it: they are the token's, read at each request."""
        return {
            "t": identity.token_id,
            "s": secrets.token_hex(8),
            "e": int(time.time() + self.lifetime),
            "x": xsrf,
        }

    def identity(self, payload: dict[str, Any] | None) -> Identity | None:
        """The identity of a decoded session cookie if it is still valid."""
        if not isinstance(payload, dict):
            return None
        try:
            token_id, session_id = str(payload["t"]), str(payload["s"])
            expires = float(payload["e"])
            xsrf = str(payload["x"])  # a session signed before XSRF binding: sign in again
        except (KeyError, TypeError, ValueError):
            return None
        if not expires > time.time() or session_id in self.revoked:
            return None
        info = self.registry.by_id(token_id)
        if info is None:  # the token was revoked: so are its sessions
            return None
        return Identity(info.name, info.role, token_id, session_id, xsrf)

    async def end(self, identity: Identity) -> None:
        """Log out: the session's cookie is refused from now on, across restarts too.

        Written (and audited) first; the session is refused in memory after the COMMIT.
        """
        if not identity.session_id:
            return
        if self._store is None:
            raise RuntimeError("Sessions.load() has not run")  # pragma: no mutate (a bug)
        store = self._store
        now = time.time()
        expires = now + self.lifetime
        async with self.registry.changing:
            await write_security(
                store, _record_session_end, store, identity, expires, self._clock()
            )
            self.revoked = {s: e for s, e in self.revoked.items() if e > now}
            self.revoked[identity.session_id] = expires


# -- storage (runs on a database worker thread) ------------------------------------------
def _load_revoked(now: float) -> dict[str, float]:
    RevokedSession.delete().where(RevokedSession.expires_at < _from_epoch(now)).execute()
    return revoked_sessions(now)


def revoked_sessions(now: float) -> dict[str, float]:
    """Logged-out sessions that have not expired: session id -> expiry (epoch s)."""
    query = RevokedSession.select().where(RevokedSession.expires_at >= _from_epoch(now))
    return {row.session_id: aware(row.expires_at).timestamp() for row in query}


def _record_session_end(store: Store, identity: Identity, expires: float, now: datetime) -> None:
    with store.db.atomic():
        bump_version()
        RevokedSession.insert(
            session_id=identity.session_id, expires_at=_from_epoch(expires)
        ).on_conflict(
            conflict_target=[RevokedSession.session_id],
            update={RevokedSession.expires_at: _from_epoch(expires)},
        ).execute()
        details = {"token_id": identity.token_id, "role": identity.role}
        record_audit(identity.name, "session.end", identity.name, details, now)


def _from_epoch(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None)
