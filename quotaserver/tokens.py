"""API tokens: digests, identities, roles, and the registry that creates and revokes them.

Tokens come from the config (SHA-256 digests or environment variables, read through
:func:`quotaserver.credentials.env_tokens`), ``QUOTASERVER_ADMIN_TOKEN``, the first-run
token file, and the admin API (stored as digests in the ``api_token`` table). Revocation is
persistent for all of them: the digest is recorded as revoked and never authenticates again,
even if the config still names it.

Security state changes all or nothing: creating or revoking a token is written (with its
audit row) to the database first, and memory changes only after the COMMIT. If the database
refuses, the caller gets :class:`AuthError` 503 and nothing has changed anywhere, so a retry
meets the real state.

The database is the cluster's truth (see :mod:`quotaserver.credential_sync`): each write
bumps the credentials version and checks, in its own transaction, that the actor is still
valid and (for a revocation) that an admin remains; every process rebuilds its copy from the
stored rows when the version moves.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import peewee

from .audit import record_audit
from .credential_sync import bump_version
from .errors import DomainError
from .models import ApiToken, RevokedSession, aware, naive_utc
from .redaction import redact
from .windows import isoformat, utc_now

if TYPE_CHECKING:
    from .db import Store

log = logging.getLogger("quotaserver.auth")

ROLES = ("admin", "viewer", "service", "metrics")
# API-created tokens carry a prefix: secret scanners and the log redaction recognise them.
TOKEN_PREFIX = "qs_"
TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
STORE_UNAVAILABLE = "the database did not accept the change; nothing was changed, retry later"
# Tokens this process declares (config, environment, first-run file, runtime); API tokens
# come from the database.
DECLARED_SOURCES = ("config", "env", "first-run", "runtime")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class Identity:
    name: str  # the token's name (never the token)
    role: str
    token_id: str  # first 16 hex digits of the token digest: ties sessions to tokens
    session_id: str | None = None  # set for browser sessions
    xsrf: str | None = None  # a session's XSRF token (hex), bound to it at sign-in

    def allowed(self, roles: frozenset[str]) -> bool:
        return self.role == "admin" or self.role in roles

    @property
    def key(self) -> str:
        return f"{self.role}:{self.name}"


ANONYMOUS_ADMIN = Identity("anonymous", "admin", "-")


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """What is known about a token; never the token itself."""

    name: str
    role: str
    source: str  # config | env | first-run | api | runtime
    token_id: str
    created_by: str | None = None
    created_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "token_id": self.token_id,
            "name": self.name,
            "role": self.role,
            "source": self.source,
            "created_by": self.created_by,
            "created_at": isoformat(self.created_at) if self.created_at else None,
            "revoked": False,
        }


class AuthError(DomainError):
    """A refused token operation; ``status`` and ``code`` go into the error envelope."""

    def __init__(self, status: int, code: str, message: str):
        headers = {"Retry-After": "5"} if status == 503 else None
        super().__init__(message, code=code, status=status, headers=headers)


async def write_security(store: Store, fn: Callable[..., Any], *args: Any) -> None:
    """Run a security write; 503 (nothing changed) if the database refuses it."""
    try:
        await store.run(fn, *args)
    except (peewee.PeeweeException, OSError) as exc:
        log.warning("security change not written: %s", redact(str(exc)) or type(exc).__name__)
        raise AuthError(503, "unavailable", STORE_UNAVAILABLE) from None


class TokenRegistry:
    """The active tokens by digest and by token id; create, revoke, list.

    The active set is rebuilt whole from the stored rows (:meth:`load_rows`): the tokens
    this process declares, less every revoked digest, plus the active API tokens.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        # Serialises changes and reloads: two revocations cannot both pass the last-admin
        # check, two creations cannot both take a name, and a reload that read the rows
        # before a local change committed cannot undo it in memory.
        self.changing = asyncio.Lock()
        self._declared: dict[str, TokenInfo] = {}  # digest -> info, declared by this process
        self._tokens: dict[str, TokenInfo] = {}  # digest -> info, active
        self._ids: dict[str, str] = {}  # token id -> digest
        self._store: Store | None = None
        self._clock: Callable[[], datetime] = utc_now

    def attach(self, store: Store, clock: Callable[[], datetime]) -> None:
        self._store, self._clock = store, clock

    def load_rows(self, rows: list[ApiToken]) -> set[str]:
        """Rebuild the active set from the stored rows; return the revoked digests."""
        revoked = {row.digest for row in rows if row.revoked_at is not None}
        tokens = {d: info for d, info in self._declared.items() if d not in revoked}
        for row in rows:
            if row.revoked_at is None and row.source == "api":
                created = aware(row.created_at)
                tokens[row.digest] = TokenInfo(
                    row.name, row.role, "api", row.digest[:16], row.created_by, created
                )
        # Two assignments, no await between: a request sees the old set or the new one.
        self._tokens, self._ids = tokens, {d[:16]: d for d in tokens}
        return revoked

    def has_admin(self) -> bool:
        return any(t.role == "admin" for t in self._tokens.values())

    def register(
        self,
        d: str,
        name: str,
        role: str,
        source: str,
        created_by: str | None = None,
        created_at: datetime | None = None,
    ) -> TokenInfo:
        info = TokenInfo(name, role, source, d[:16], created_by, created_at)
        if source in DECLARED_SOURCES:
            self._declared[d] = info
        self._tokens[d] = info
        self._ids[d[:16]] = d
        return info

    def forget(self, d: str) -> None:
        if self._tokens.pop(d, None) is not None:
            self._ids.pop(d[:16], None)

    def by_id(self, token_id: str) -> TokenInfo | None:
        d = self._ids.get(token_id)
        return self._tokens[d] if d is not None else None

    def active(self, token_id: str) -> bool:
        return token_id in self._ids

    def authenticate(self, token: str | None) -> Identity | None:
        """The identity of an API token, or None."""
        if not token:
            return None
        # A dict lookup by digest leaks nothing useful through timing: an attacker would
        # have to choose inputs by their SHA-256, which is the hard problem itself.
        return self.authenticate_digest(digest(token))

    def authenticate_digest(self, d: str) -> Identity | None:
        info = self._tokens.get(d)
        return Identity(info.name, info.role, info.token_id) if info else None

    def add_token(self, token: str, name: str, role: str) -> None:
        """Register a token for this process only (not stored), e.g. the demo traffic's."""
        if role not in ROLES:
            raise ValueError(role)
        self.register(digest(token), name, role, "runtime")

    def tokens(self) -> list[TokenInfo]:
        """The active tokens."""
        return sorted(self._tokens.values(), key=lambda t: (t.name, t.token_id))

    async def token_list(self) -> list[dict[str, Any]]:
        """Active tokens, then revoked ones with who revoked them and when."""
        active = [t.to_json() for t in self.tokens()]
        rows = await self._require_store().run(_revoked_rows)
        return active + [_revoked_json(row) for row in rows]

    async def create_token(
        self, name: Any, role: Any, actor: str, by: Identity | None = None
    ) -> tuple[str, TokenInfo]:
        """A new random token; only its digest is stored. Returns (token, info).

        ``by`` (the caller's identity) must still be valid in the database when the token
        is written: a revoked admin cannot create tokens on a process that has not heard of
        the revocation yet.
        """
        if not isinstance(role, str) or role not in ROLES:
            raise AuthError(400, "invalid_field", "role must be one of " + ", ".join(ROLES))
        if not isinstance(name, str) or not TOKEN_NAME.match(name):
            raise AuthError(
                400,
                "invalid_field",
                "name must be 1-64 letters, digits or . _ @ - (starting with a letter or digit)",
            )
        store = self._require_store()
        async with self.changing:
            if any(t.name == name for t in self._tokens.values()):
                raise AuthError(409, "conflict", "an active token already has this name")
            token = TOKEN_PREFIX + secrets.token_urlsafe(32)
            d = digest(token)
            info = TokenInfo(name, role, "api", d[:16], actor, self._clock())
            await write_security(store, _insert_token, store, d, info, by)
            self.register(d, name, role, "api", actor, info.created_at)  # after COMMIT
        log.info("token %s (%s) created by %s", name, role, actor)
        return token, info

    async def revoke_token(
        self, token_id: str, actor: str, by: Identity | None = None
    ) -> TokenInfo:
        """Revoke a token of any source, persistently. The caller ends its connections.

        Until the revocation has committed the token keeps working; once it has, it is
        refused. A failed write leaves it active (503), so a retry can succeed. The last
        admin rule and ``by``'s own validity are checked in the database, in the
        revocation's transaction, so they hold across every process.
        """
        store = self._require_store()
        async with self.changing:
            d = self._ids.get(token_id)
            if d is None:
                revoked = await store.run(_revoked_row, token_id)
                if revoked is not None:  # a retry after success: say so
                    raise _already_revoked(revoked)
                raise AuthError(404, "unknown_token", "no active token has this id")
            info = self._tokens[d]
            declared_admins = [k for k, t in self._declared.items() if t.role == "admin"]
            await write_security(
                store,
                _record_revocation,
                store,
                d,
                info,
                actor,
                self._clock(),
                by,
                declared_admins if self.enabled else None,
            )
            self.forget(d)  # after COMMIT
        log.info("token %s (%s) revoked by %s", info.name, info.role, actor)
        return info

    def _require_store(self) -> Store:
        if self._store is None:
            raise RuntimeError("Auth.load() has not run")  # pragma: no mutate (a bug)
        return self._store


# -- storage (runs on a database worker thread) ------------------------------------------
def load_token_rows() -> list[ApiToken]:
    return list(ApiToken.select())


def check_actor(by: Identity | None) -> None:
    """401 unless ``by`` is still valid in the database (call inside the transaction)."""
    if by is None or by.token_id == "-":  # internal callers; authentication disabled
        return
    revoked = ApiToken.select().where(
        ApiToken.digest.startswith(by.token_id), ApiToken.revoked_at.is_null(False)
    )
    ended = by.session_id is not None and (
        RevokedSession.select().where(RevokedSession.session_id == by.session_id).exists()
    )
    if ended or revoked.exists():
        raise AuthError(401, "unauthorized", "these credentials were revoked")


def _insert_token(store: Store, d: str, info: TokenInfo, by: Identity | None) -> None:
    assert info.created_at is not None and info.created_by is not None
    with store.db.atomic():
        bump_version()
        check_actor(by)
        taken = ApiToken.select().where(
            ApiToken.name == info.name, ApiToken.source == "api", ApiToken.revoked_at.is_null()
        )
        if taken.exists():  # created on another process a moment ago
            raise AuthError(409, "conflict", "an active token already has this name")
        ApiToken.create(
            digest=d,
            name=info.name,
            role=info.role,
            source="api",
            created_by=info.created_by,
            created_at=naive_utc(info.created_at),
        )
        details = {"token_id": info.token_id, "role": info.role}
        record_audit(info.created_by, "token.create", info.name, details, info.created_at)


def _record_revocation(
    store: Store,
    d: str,
    info: TokenInfo,
    actor: str,
    now: datetime,
    by: Identity | None,
    declared_admins: list[str] | None,
) -> None:
    with store.db.atomic():
        bump_version()  # first: on PostgreSQL this row lock serialises the cluster's changes
        check_actor(by)
        row = ApiToken.get_or_none(ApiToken.digest == d)
        if row is not None and row.revoked_at is not None:  # revoked on another process
            raise _already_revoked(row)
        if info.role == "admin" and declared_admins is not None:
            _keep_an_admin(d, declared_admins)
        if row is not None:
            ApiToken.update(revoked_by=actor, revoked_at=naive_utc(now)).where(
                ApiToken.digest == d
            ).execute()
        else:  # a token declared outside the database: remember its digest
            ApiToken.create(
                digest=d,
                name=info.name,
                role=info.role,
                source=info.source,
                created_by=info.created_by or info.source,
                created_at=naive_utc(info.created_at or now),
                revoked_by=actor,
                revoked_at=naive_utc(now),
            )
        details = {"token_id": info.token_id, "role": info.role, "source": info.source}
        record_audit(actor, "token.revoke", info.name, details, now)


def _keep_an_admin(d: str, declared_admins: list[str]) -> None:
    """409 if revoking the admin token ``d`` would leave no admin in the cluster: the
    active API admin tokens and the declared admin tokens not revoked, as committed."""
    revoked = {
        row.digest
        for row in ApiToken.select(ApiToken.digest).where(ApiToken.revoked_at.is_null(False))
    }
    stored = ApiToken.select(ApiToken.digest).where(
        ApiToken.role == "admin", ApiToken.source == "api", ApiToken.revoked_at.is_null()
    )
    admins = {row.digest for row in stored} | {a for a in declared_admins if a not in revoked}
    if not admins - {d}:
        raise AuthError(409, "last_admin", "the last admin token cannot be revoked")


def _already_revoked(row: ApiToken) -> AuthError:
    when = isoformat(aware(row.revoked_at))
    message = f"this token was already revoked by {row.revoked_by} at {when}"
    return AuthError(404, "unknown_token", message)


def _revoked_row(token_id: str) -> ApiToken | None:
    query = ApiToken.select().where(
        ApiToken.digest.startswith(token_id), ApiToken.revoked_at.is_null(False)
    )
    return query.first()


def _revoked_rows() -> list[ApiToken]:
    query = ApiToken.select().where(ApiToken.revoked_at.is_null(False))
    return list(query.order_by(ApiToken.revoked_at.desc()))


def _revoked_json(row: ApiToken) -> dict[str, Any]:
    return {
        "token_id": row.digest[:16],
        "name": row.name,
        "role": row.role,
        "source": row.source,
        "created_by": row.created_by,
        "created_at": isoformat(aware(row.created_at)),
        "revoked": True,
        "revoked_by": row.revoked_by,
        "revoked_at": isoformat(aware(row.revoked_at)),
    }
