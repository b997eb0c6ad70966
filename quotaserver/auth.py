"""Who is calling: API tokens, roles, browser sessions, origins; secrets kept out of logs.

Roles: ``admin`` may do everything; ``viewer`` reads (dashboard, streams, read-only admin
API); ``service`` checks and consumes quotas and reads a user's status.

Tokens come from the config (SHA-256 digests or environment variables),
``QUOTASERVER_ADMIN_TOKEN``, the first-run token file, and the admin API (stored as
digests in the ``api_token`` table). Revocation is persistent for all of them: the digest
is recorded as revoked and never authenticates again, even if the config still names it.

Browser sessions are signed cookies that name the token they came from (its token id), so
revoking a token ends its sessions; logging out records the session as revoked (in the
database too, so a restart does not bring it back). The app closes the live connections
of a revoked identity with 1008.

Security state changes all or nothing: creating or revoking a token and ending a session
are written (with their audit row) to the database first, and memory changes only after
the COMMIT. If the database refuses, the caller gets :class:`AuthError` 503 and nothing has
changed anywhere, so a retry meets the real state.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import peewee

from .audit import record_audit
from .auth_failures import FailedAuthLimiter
from .config import Config, ConfigError
from .errors import DomainError
from .login_codes import LoginCodes
from .models import ApiToken, RevokedSession, aware, naive_utc
from .origins import HostPolicy
from .redaction import install_log_redaction, redact  # noqa: F401 - redact is re-exported
from .secret_files import read_or_create_secret, write_secret
from .windows import isoformat, utc_now

if TYPE_CHECKING:
    from .db import Store

log = logging.getLogger(__name__)

ROLES = ("admin", "viewer", "service", "metrics")
SESSION_COOKIE = "qs_session"
# API-created tokens carry a prefix: secret scanners and the log redaction recognise them.
TOKEN_PREFIX = "qs_"
TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class Identity:
    name: str  # the token's name (never the token)
    role: str
    token_id: str  # first 16 hex digits of the token digest: ties sessions to tokens
    session_id: str | None = None  # set for browser sessions

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


STORE_UNAVAILABLE = "the database did not accept the change; nothing was changed, retry later"


class Auth:
    """Token registry, session rules and origin checks for one application."""

    def __init__(self, config: Config, env: dict[str, str] | None = None):
        env = dict(os.environ) if env is None else env
        self.enabled: bool = config["auth.enabled"]
        self.session_lifetime: float = config["auth.session_lifetime"]
        self.hosts = HostPolicy(config["server.public_origins"], self.enabled)
        self.allowed_origins = frozenset(
            o.rstrip("/") for o in config["auth.allowed_origins"] + config["server.public_origins"]
        )
        self.token_file: str = config["auth.token_file"]
        self.login_codes = LoginCodes(config["auth.login_code_lifetime"])
        self.failures = FailedAuthLimiter(
            config["auth.failed_attempts_per_ip"], config["auth.failed_window"]
        )
        # Serialises changes of security state: two revocations cannot both pass the
        # last-admin check, two creations cannot both take a name.
        self._changing = asyncio.Lock()
        self._tokens: dict[str, TokenInfo] = {}  # digest -> info
        self._ids: dict[str, str] = {}  # token id -> digest
        self.revoked_sessions: dict[str, float] = {}  # session id -> expiry (epoch s)
        self.first_run_token: str | None = None  # set when generated or read from token_file
        self._store: Store | None = None
        self._clock: Callable[[], datetime] = utc_now
        install_log_redaction()

        for entry in config["auth.tokens"]:
            if "sha256" in entry:
                self._register(entry["sha256"].lower(), entry["name"], entry["role"], "config")
                continue
            value = env.get(entry["env"])
            if not value:
                raise ConfigError(
                    f"auth.tokens: environment variable {entry['env']} "
                    f"(token {entry['name']!r}) is not set"
                )
            self._register(digest(value), entry["name"], entry["role"], "env")
        env_admin = env.get("QUOTASERVER_ADMIN_TOKEN")
        if env_admin:
            self._register(digest(env_admin), "env-admin", "admin", "env")

    async def load(self, store: Store, clock: Callable[[], datetime] = utc_now) -> None:
        """After migrations: stored tokens, revocations, logged-out sessions, first-run token."""
        self._store, self._clock = store, clock
        rows, sessions = await store.run(_load_state, time.time())
        revoked = {row.digest for row in rows if row.revoked_at is not None}
        for d in revoked:
            self._forget(d)
        for row in rows:
            if row.revoked_at is None and row.source == "api":
                self._register(
                    row.digest, row.name, row.role, "api", row.created_by, aware(row.created_at)
                )
        self.revoked_sessions = sessions
        if not self.enabled or any(t.role == "admin" for t in self._tokens.values()):
            return
        # No admin declared: use (or create) the first-run token so the server is usable
        # at once, yet nothing is open without credentials.
        token, _ = read_or_create_secret(self.token_file, 24, "auth.token_file")
        if digest(token) in revoked:
            if any(t.role == "admin" for t in self._tokens.values()):
                return  # retired through the API while another admin token exists
            token = write_secret(self.token_file, 24, "auth.token_file")
        self._register(digest(token), "first-run-admin", "admin", "first-run")
        self.first_run_token = token

    # -- tokens ------------------------------------------------------------------------
    def _register(
        self,
        d: str,
        name: str,
        role: str,
        source: str,
        created_by: str | None = None,
        created_at: datetime | None = None,
    ) -> TokenInfo:
        info = TokenInfo(name, role, source, d[:16], created_by, created_at)
        self._tokens[d] = info
        self._ids[d[:16]] = d
        return info

    def _forget(self, d: str) -> None:
        if self._tokens.pop(d, None) is not None:
            self._ids.pop(d[:16], None)

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

    def issue_login_code(self, code: str | None = None) -> str | None:
        """A one-time code for the first-run admin token (the start-up link), if in use;
        ``code`` adopts one issued by the parent of worker processes instead."""
        if self.first_run_token is None:
            return None
        if code is not None:
            self.login_codes.adopt(code, digest(self.first_run_token))
            return code
        return self.login_codes.issue(digest(self.first_run_token))

    def still_valid(self, identity: Identity) -> bool:
        """Whether a request admitted as ``identity`` would still be admitted now."""
        if not self.enabled:
            return True
        if identity.session_id and identity.session_id in self.revoked_sessions:
            return False
        return identity.token_id in self._ids

    def add_token(self, token: str, name: str, role: str) -> None:
        """Register a token for this process only (not stored), e.g. the demo traffic's."""
        if role not in ROLES:
            raise ValueError(role)
        self._register(digest(token), name, role, "runtime")

    def tokens(self) -> list[TokenInfo]:
        """The active tokens."""
        return sorted(self._tokens.values(), key=lambda t: (t.name, t.token_id))

    async def token_list(self) -> list[dict[str, Any]]:
        """Active tokens, then revoked ones with who revoked them and when."""
        active = [t.to_json() for t in self.tokens()]
        rows = await self._require_store().run(_revoked_rows)
        return active + [_revoked_json(row) for row in rows]

    async def create_token(self, name: Any, role: Any, actor: str) -> tuple[str, TokenInfo]:
        """A new random token; only its digest is stored. Returns (token, info)."""
        if not isinstance(role, str) or role not in ROLES:
            raise AuthError(400, "invalid_field", "role must be one of " + ", ".join(ROLES))
        if not isinstance(name, str) or not TOKEN_NAME.match(name):
            raise AuthError(
                400,
                "invalid_field",
                "name must be 1-64 letters, digits or . _ @ - (starting with a letter or digit)",
            )
        store = self._require_store()
        async with self._changing:
            if any(t.name == name for t in self._tokens.values()):
                raise AuthError(409, "conflict", "an active token already has this name")
            token = TOKEN_PREFIX + secrets.token_urlsafe(32)
            d = digest(token)
            info = TokenInfo(name, role, "api", d[:16], actor, self._clock())
            await _write(store, _insert_token, store, d, info)
            self._register(d, name, role, "api", actor, info.created_at)  # after COMMIT
        log.info("token %s (%s) created by %s", name, role, actor)
        return token, info

    async def revoke_token(self, token_id: str, actor: str) -> TokenInfo:
        """Revoke a token of any source, persistently. The caller ends its connections.

        Until the revocation has committed the token keeps working; once it has, it is
        refused. A failed write leaves it active (503), so a retry can succeed.
        """
        store = self._require_store()
        async with self._changing:
            d = self._ids.get(token_id)
            if d is None:
                revoked = await store.run(_revoked_row, token_id)
                if revoked is not None:  # a retry after success: say so
                    when = isoformat(aware(revoked.revoked_at))
                    message = f"this token was already revoked by {revoked.revoked_by} at {when}"
                    raise AuthError(404, "unknown_token", message)
                raise AuthError(404, "unknown_token", "no active token has this id")
            info = self._tokens[d]
            admins = sum(1 for t in self._tokens.values() if t.role == "admin")
            if info.role == "admin" and admins <= 1 and self.enabled:
                raise AuthError(409, "last_admin", "the last admin token cannot be revoked")
            await _write(store, _record_revocation, store, d, info, actor, self._clock())
            self._forget(d)  # after COMMIT
        log.info("token %s (%s) revoked by %s", info.name, info.role, actor)
        return info

    def _require_store(self) -> Store:
        if self._store is None:
            raise RuntimeError("Auth.load() has not run")
        return self._store

    # -- sessions ----------------------------------------------------------------------
    def new_session(self, identity: Identity) -> dict[str, Any]:
        return {
            "n": identity.name,
            "r": identity.role,
            "t": identity.token_id,
            "s": secrets.token_hex(8),
            "e": int(time.time() + self.session_lifetime),
        }

    def session_identity(self, payload: dict[str, Any] | None) -> Identity | None:
        """The identity of a decoded session cookie if it is still valid."""
        if not isinstance(payload, dict):
            return None
        try:
            token_id, session_id = str(payload["t"]), str(payload["s"])
            expires = float(payload["e"])
        except (KeyError, TypeError, ValueError):
            return None
        if not expires > time.time() or session_id in self.revoked_sessions:
            return None
        d = self._ids.get(token_id)
        if d is None:  # the token was revoked: so are its sessions
            return None
        info = self._tokens[d]
        return Identity(info.name, info.role, token_id, session_id)

    async def end_session(self, identity: Identity) -> None:
        """Log out: the session's cookie is refused from now on, across restarts too.

        Written (and audited) first; the session is refused in memory after the COMMIT.
        """
        if not identity.session_id:
            return
        store = self._require_store()
        now = time.time()
        expires = now + self.session_lifetime
        async with self._changing:
            await _write(store, _record_session_end, store, identity, expires, self._clock())
            self.revoked_sessions = {s: e for s, e in self.revoked_sessions.items() if e > now}
            self.revoked_sessions[identity.session_id] = expires

    # -- origins -----------------------------------------------------------------------
    def origin_allowed(self, origin: str, host: str, scheme: str) -> bool:
        """Exact match with the server's own origin or an allow-listed or public one.

        ``host`` has passed :class:`HostPolicy` before any handler ran, so a rebound name
        (``Host: rebind.test`` with ``Origin: http://rebind.test``) never gets this far.
        """
        origin = origin.rstrip("/")
        return origin == f"{scheme}://{host}" or origin in self.allowed_origins


async def _write(store: Store, fn: Callable[..., Any], *args: Any) -> None:
    """Run a security write; 503 (nothing changed) if the database refuses it."""
    try:
        await store.run(fn, *args)
    except (peewee.PeeweeException, OSError) as exc:
        log.warning("security change not written: %s", redact(str(exc)) or type(exc).__name__)
        raise AuthError(503, "unavailable", STORE_UNAVAILABLE) from None


# -- storage (runs on a database worker thread) ------------------------------------------
def _load_state(now: float) -> tuple[list[ApiToken], dict[str, float]]:
    RevokedSession.delete().where(RevokedSession.expires_at < _from_epoch(now)).execute()
    sessions = {
        row.session_id: aware(row.expires_at).timestamp() for row in RevokedSession.select()
    }
    return list(ApiToken.select()), sessions


def _insert_token(store: Store, d: str, info: TokenInfo) -> None:
    assert info.created_at is not None and info.created_by is not None
    with store.db.atomic():
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


def _record_revocation(store: Store, d: str, info: TokenInfo, actor: str, now: datetime) -> None:
    with store.db.atomic():
        updated = (
            ApiToken.update(revoked_by=actor, revoked_at=naive_utc(now))
            .where(ApiToken.digest == d)
            .execute()
        )
        if not updated:  # a token declared outside the database: remember its digest
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


def _record_session_end(store: Store, identity: Identity, expires: float, now: datetime) -> None:
    with store.db.atomic():
        RevokedSession.insert(
            session_id=identity.session_id, expires_at=_from_epoch(expires)
        ).on_conflict(
            conflict_target=[RevokedSession.session_id],
            update={RevokedSession.expires_at: _from_epoch(expires)},
        ).execute()
        details = {"token_id": identity.token_id, "role": identity.role}
        record_audit(identity.name, "session.end", identity.name, details, now)


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


def _from_epoch(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC).replace(tzinfo=None)
