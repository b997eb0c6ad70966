"""Who is calling: API tokens (stored as SHA-256 digests), roles, browser sessions.

Roles: ``admin`` may do everything; ``viewer`` reads (dashboard, streams, read-only admin
API); ``service`` checks and consumes quotas and reads a user's status. Browser sessions
are signed cookies that name the token they came from, so revoking a token (or logging
out) ends its sessions; live connections of that identity are then closed with 1008.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

from .config import Config, ConfigError

log = logging.getLogger(__name__)

ROLES = ("admin", "viewer", "service")
SESSION_COOKIE = "qs_session"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


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


def _read_or_create_secret(path: str, nbytes: int) -> tuple[str, bool]:
    """Read a secret file, or create it with mode 0600. Returns (secret, created)."""
    try:
        with open(path, encoding="ascii") as fh:
            value = fh.read().strip()
        if value:
            return value, False
    except FileNotFoundError:
        pass
    directory = os.path.dirname(path)
    try:
        if directory:
            os.makedirs(directory, exist_ok=True)
        value = secrets.token_urlsafe(nbytes)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(value + "\n")
        os.chmod(path, 0o600)
    except OSError as exc:
        raise ConfigError(f"auth.token_file: cannot write {path}: {exc.strerror}") from None
    return value, True


class Auth:
    """Token registry and session rules for one application."""

    def __init__(self, config: Config, env: dict[str, str] | None = None):
        env = dict(os.environ) if env is None else env
        self.enabled: bool = config["auth.enabled"]
        self.session_lifetime: float = config["auth.session_lifetime"]
        self.allowed_origins = frozenset(o.rstrip("/") for o in config["auth.allowed_origins"])
        self._tokens: dict[str, tuple[str, str]] = {}  # digest -> (name, role)
        self.revoked_sessions: dict[str, float] = {}  # session id -> expiry
        self.first_run_token: str | None = None  # set when generated or read from token_file
        self.first_run_created = False

        for entry in config["auth.tokens"]:
            if "sha256" in entry:
                self._tokens[entry["sha256"].lower()] = (entry["name"], entry["role"])
            else:
                value = env.get(entry["env"])
                if not value:
                    raise ConfigError(
                        f"auth.tokens: environment variable {entry['env']} "
                        f"(token {entry['name']!r}) is not set"
                    )
                self._tokens[digest(value)] = (entry["name"], entry["role"])
        env_admin = env.get("QUOTASERVER_ADMIN_TOKEN")
        if env_admin:
            self._tokens[digest(env_admin)] = ("env-admin", "admin")
        if self.enabled and not any(role == "admin" for _, role in self._tokens.values()):
            token, created = _read_or_create_secret(config["auth.token_file"], 24)
            self._tokens[digest(token)] = ("first-run-admin", "admin")
            self.first_run_token, self.first_run_created = token, created

    # -- tokens ------------------------------------------------------------------------
    def authenticate(self, token: str | None) -> Identity | None:
        """The identity of an API token, or None."""
        if not token:
            return None
        d = digest(token)
        for known, (name, role) in self._tokens.items():
            if hmac.compare_digest(known, d):
                return Identity(name, role, d[:16])
        return None

    def add_token(self, token: str, name: str, role: str) -> None:
        if role not in ROLES:
            raise ValueError(role)
        self._tokens[digest(token)] = (name, role)

    def revoke_token(self, name: str) -> list[str]:
        """Forget every token called ``name``; return their token ids."""
        gone = [d for d, (n, _) in self._tokens.items() if n == name]
        for d in gone:
            del self._tokens[d]
        return [d[:16] for d in gone]

    def token_id_valid(self, token_id: str) -> bool:
        return any(d.startswith(token_id) for d in self._tokens)

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
            name, role, token_id = str(payload["n"]), str(payload["r"]), str(payload["t"])
            session_id, expires = str(payload["s"]), float(payload["e"])
        except (KeyError, TypeError, ValueError):
            return None
        if expires < time.time() or session_id in self.revoked_sessions:
            return None
        if role not in ROLES or not self.token_id_valid(token_id):
            return None
        return Identity(name, role, token_id, session_id)

    def end_session(self, identity: Identity) -> None:
        if identity.session_id:
            now = time.time()
            self.revoked_sessions = {s: e for s, e in self.revoked_sessions.items() if e > now}
            self.revoked_sessions[identity.session_id] = now + self.session_lifetime

    # -- origins -----------------------------------------------------------------------
    def origin_allowed(self, origin: str, host: str, scheme: str) -> bool:
        """Exact match with the server's own origin or an allow-listed one."""
        origin = origin.rstrip("/")
        return origin == f"{scheme}://{host}" or origin in self.allowed_origins
