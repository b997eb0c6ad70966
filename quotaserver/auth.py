"""Who is calling, composed from one module per concern.

Roles: ``admin`` may do everything; ``viewer`` reads (dashboard, streams, read-only admin
API); ``service`` checks and consumes quotas and reads a user's status.

- :mod:`quotaserver.tokens`: digests, identities and the token registry (create, revoke);
- :mod:`quotaserver.sessions`: browser sessions and logout;
- :mod:`quotaserver.origins`: which Host and Origin values are ours;
- :mod:`quotaserver.credentials`: tokens given through the environment, checked once;
- :mod:`quotaserver.secret_files`: the first-run token file (and the cookie secret);
- :mod:`quotaserver.login_codes`, :mod:`quotaserver.auth_failures`: one-time login codes
  and the failed-authentication limit.

Log redaction (:mod:`quotaserver.redaction`) is installed by the entry point (``cli``).
:class:`Auth` only wires these together for one application.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .auth_failures import FailedAuthLimiter
from .config import Config
from .credential_sync import CredentialSync, read_version
from .credentials import env_tokens
from .login_codes import LoginCodes
from .origins import HostPolicy, OriginPolicy
from .secret_files import read_or_create_secret, write_secret
from .sessions import SESSION_COOKIE, Sessions, revoked_sessions
from .tokens import (
    ANONYMOUS_ADMIN,
    ROLES,
    AuthError,
    Identity,
    TokenInfo,
    TokenRegistry,
    digest,
    load_token_rows,
)
from .windows import utc_now

if TYPE_CHECKING:
    from .db import Store

__all__ = [
    "ANONYMOUS_ADMIN",
    "ROLES",
    "SESSION_COOKIE",
    "Auth",
    "AuthError",
    "Identity",
    "TokenInfo",
]


class Auth:
    """The tokens, sessions, origin and host policies, login codes and failure limit of one
    application."""

    def __init__(self, config: Config, env: dict[str, str] | None = None):
        env = dict(os.environ) if env is None else env
        self.enabled: bool = config["auth.enabled"]
        self.hosts = HostPolicy(config["server.public_origins"], self.enabled)
        self.origins = OriginPolicy(
            config["auth.allowed_origins"] + config["server.public_origins"]
        )
        self.token_file: str = config["auth.token_file"]
        self.login_codes = LoginCodes(config["auth.login_code_lifetime"])
        self.failures = FailedAuthLimiter(
            config["auth.failed_attempts_per_ip"], config["auth.failed_window"]
        )
        self.registry = TokenRegistry(self.enabled)
        self.sessions = Sessions(self.registry, config["auth.session_lifetime"])
        self.first_run_token: str | None = None  # set when generated or read from token_file
        self.sync_interval: float = config["auth.sync_interval"]
        #: Keeps this process's credentials equal to the database's (set by :meth:`load`).
        self.sync: CredentialSync | None = None
        #: Called after every reload (the app closes streams whose credentials are gone)
        #: and after every local change has committed (the app nudges other instances).
        self.on_reload: Callable[[], None] | None = None
        self.on_change: Callable[[], None] | None = None
        self._store: Store | None = None
        for entry in config["auth.tokens"]:
            if "sha256" in entry:
                self.registry.register(
                    entry["sha256"].lower(), entry["name"], entry["role"], "config"
                )
        for token, name, role in env_tokens(config, env):
            self.registry.register(digest(token), name, role, "env")

    async def load(self, store: Store, clock: Callable[[], datetime] = utc_now) -> None:
        """After migrations: stored tokens, revocations, logged-out sessions, first-run token."""
        self._store = store
        self.registry.attach(store, clock)
        self.login_codes.attach(store)
        version = await store.read(read_version)
        revoked = self.registry.load_rows(await store.run(load_token_rows))
        await self.sessions.load(store, clock)
        self.sync = CredentialSync(
            lambda: store.read(read_version), self.reload, version, self.sync_interval
        )
        if not self.enabled or self.registry.has_admin():
            return
        # No admin declared: use (or create) the first-run token so the server is usable
        # at once, yet nothing is open without credentials.
        token, _ = read_or_create_secret(self.token_file, 24, "auth.token_file")
        if digest(token) in revoked:
            token = write_secret(self.token_file, 24, "auth.token_file")
        self.registry.register(digest(token), "first-run-admin", "admin", "first-run")
        self.first_run_token = token

    async def reload(self) -> int:
        """Rebuild tokens and revoked sessions from the database; return the version read.

        The version is read before the rows: a change committed in between is loaded now
        and loaded again at the next check, never missed.
        """
        assert self._store is not None
        async with self.registry.changing:  # a local change in flight finishes first
            version, rows, sessions = await self._store.read(_load_credentials, time.time())
            self.registry.load_rows(rows)
            self.sessions.revoked = sessions
        if self.on_reload is not None:
            self.on_reload()
        return version

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    # -- the request path --------------------------------------------------------------
    @property
    def session_lifetime(self) -> float:
        return self.sessions.lifetime

    @property
    def revoked_sessions(self) -> dict[str, float]:
        return self.sessions.revoked

    def authenticate(self, token: str | None) -> Identity | None:
        return self.registry.authenticate(token)

    def authenticate_digest(self, d: str) -> Identity | None:
        return self.registry.authenticate_digest(d)

    def session_identity(self, payload: dict[str, Any] | None) -> Identity | None:
        return self.sessions.identity(payload)

    def new_session(self, identity: Identity, xsrf: str) -> dict[str, Any]:
        return self.sessions.new_session(identity, xsrf)

    async def end_session(self, identity: Identity) -> None:
        await self.sessions.end(identity)
        self._changed()

    def origin_allowed(self, origin: str, host: str, scheme: str) -> bool:
        return self.origins.allowed_for(origin, host, scheme)

    def still_valid(self, identity: Identity) -> bool:
        """Whether a request admitted as ``identity`` would still be admitted now."""
        return self.valid_ids(identity.token_id, identity.session_id)

    def valid_ids(self, token_id: str, session_id: str | None) -> bool:
        """:meth:`still_valid` by the ids a live connection keeps."""
        if not self.enabled:
            return True
        if session_id and session_id in self.sessions.revoked:
            return False
        return self.registry.active(token_id)

    async def issue_login_code(self) -> str | None:
        """A one-time code for the first-run admin token (the start-up link), if in use."""
        if self.first_run_token is None:
            return None
        return await self.login_codes.issue(digest(self.first_run_token))

    # -- token administration ----------------------------------------------------------
    def add_token(self, token: str, name: str, role: str) -> None:
        self.registry.add_token(token, name, role)

    def tokens(self) -> list[TokenInfo]:
        return self.registry.tokens()

    async def token_list(self) -> list[dict[str, Any]]:
        return await self.registry.token_list()

    async def create_token(
        self, name: Any, role: Any, actor: str, by: Identity | None = None
    ) -> tuple[str, TokenInfo]:
        created = await self.registry.create_token(name, role, actor, by)
        self._changed()
        return created

    async def revoke_token(
        self, token_id: str, actor: str, by: Identity | None = None
    ) -> TokenInfo:
        info = await self.registry.revoke_token(token_id, actor, by)
        self._changed()
        return info


def _load_credentials(now: float) -> tuple[int, list[Any], dict[str, float]]:
    return read_version(), load_token_rows(), revoked_sessions(now)
