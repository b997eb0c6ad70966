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
"""

from __future__ import annotations

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

from .audit import record_audit
from .config import Config, ConfigError
from .models import ApiToken, RevokedSession, aware, naive_utc
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


class AuthError(Exception):
    """A refused token operation; ``status`` and ``code`` go into the error envelope."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _write_secret(path: str, nbytes: int) -> str:
    value = secrets.token_urlsafe(nbytes)
    directory = os.path.dirname(path)
    try:
        if directory:
            os.makedirs(directory, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(value + "\n")
        os.chmod(path, 0o600)  # O_CREAT's mode does not apply to an existing file
    except OSError as exc:
        raise ConfigError(f"auth.token_file: cannot write {path}: {exc.strerror}") from None
    return value


def _read_or_create_secret(path: str, nbytes: int) -> tuple[str, bool]:
    """Read a secret file, or create it with mode 0600. Returns (secret, created)."""
    try:
        with open(path, encoding="ascii") as fh:
            value = fh.read().strip()
        if value:
            return value, False
    except FileNotFoundError:
        pass
    return _write_secret(path, nbytes), True


class Auth:
    """Token registry, session rules and origin checks for one application."""

    def __init__(self, config: Config, env: dict[str, str] | None = None):
        env = dict(os.environ) if env is None else env
        self.enabled: bool = config["auth.enabled"]
        self.session_lifetime: float = config["auth.session_lifetime"]
        self.allowed_origins = frozenset(o.rstrip("/") for o in config["auth.allowed_origins"])
        self.token_file: str = config["auth.token_file"]
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
        token, _ = _read_or_create_secret(self.token_file, 24)
        if digest(token) in revoked:
            if any(t.role == "admin" for t in self._tokens.values()):
                return  # retired through the API while another admin token exists
            token = _write_secret(self.token_file, 24)
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
        d = digest(token)
        info = self._tokens.get(d)
        return Identity(info.name, info.role, info.token_id) if info else None

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
        if any(t.name == name for t in self._tokens.values()):
            raise AuthError(409, "conflict", "an active token already has this name")
        store = self._require_store()
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        d = digest(token)
        # Registered before the write so that a concurrent request cannot take the name.
        info = self._register(d, name, role, "api", actor, self._clock())
        try:
            await store.run(_insert_token, store, d, info)
        except Exception:
            self._forget(d)
            raise
        log.info("token %s (%s) created by %s", name, role, actor)
        return token, info

    async def revoke_token(self, token_id: str, actor: str) -> TokenInfo:
        """Revoke a token of any source, persistently. The caller ends its connections."""
        d = self._ids.get(token_id)
        if d is None:
            raise AuthError(404, "unknown_token", "no active token has this id")
        info = self._tokens[d]
        admins = sum(1 for t in self._tokens.values() if t.role == "admin")
        if info.role == "admin" and admins <= 1 and self.enabled:
            raise AuthError(409, "last_admin", "the last admin token cannot be revoked")
        # Forget first: from now on no request authenticates with it, even while the
        # revocation is being written.
        self._forget(d)
        store = self._require_store()
        await store.run(_record_revocation, store, d, info, actor, self._clock())
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
        """Log out: the session's cookie is refused from now on, across restarts too."""
        if not identity.session_id:
            return
        now = time.time()
        self.revoked_sessions = {s: e for s, e in self.revoked_sessions.items() if e > now}
        expires = now + self.session_lifetime
        self.revoked_sessions[identity.session_id] = expires
        if self._store is not None:
            await self._store.run(_record_session_end, identity.session_id, expires)

    # -- origins -----------------------------------------------------------------------
    def origin_allowed(self, origin: str, host: str, scheme: str) -> bool:
        """Exact match with the server's own origin or an allow-listed one."""
        origin = origin.rstrip("/")
        return origin == f"{scheme}://{host}" or origin in self.allowed_origins


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


def _record_session_end(session_id: str, expires: float) -> None:
    RevokedSession.insert(session_id=session_id, expires_at=_from_epoch(expires)).on_conflict(
        conflict_target=[RevokedSession.session_id],
        update={RevokedSession.expires_at: _from_epoch(expires)},
    ).execute()


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


# -- log redaction ---------------------------------------------------------------------
# Defence in depth for records we do not write ourselves (Tornado's): our own code logs
# names and token ids, never tokens, and the access log has no query strings.
_REDACTIONS = (
    (re.compile(r"(?i)(bearer\s+)[^\s'\",;]+"), r"\1<redacted>"),
    (re.compile(r"(?i)([?&;]token=)[^&\s'\"]+"), r"\1<redacted>"),
    (re.compile(r"(?i)(qs_session=)[^;\s'\"]+"), r"\1<redacted>"),
    (re.compile(r"qs_[A-Za-z0-9_-]{16,}"), "<redacted>"),
    (re.compile(r"(Invalid header value ).*"), r"\1<redacted>"),
)
REDACTED_LOGGERS = ("tornado.access", "tornado.application", "tornado.general", "asyncio", "")


def redact(text: str) -> str:
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


class RedactSecrets(logging.Filter):
    """Rewrites a record whose text looks like it carries a credential."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's problem, not ours
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def install_log_redaction() -> None:
    """Attach :class:`RedactSecrets` to Tornado's loggers (idempotent)."""
    for name in REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
