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
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .auth_failures import FailedAuthLimiter
from .config import Config
from .credentials import env_tokens
from .login_codes import LoginCodes
from .origins import HostPolicy, OriginPolicy
from .secret_files import read_or_create_secret, write_secret
from .sessions import SESSION_COOKIE, Sessions
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
        for entry in config["auth.tokens"]:
            if "sha256" in entry:
                self.registry.register(
                    entry["sha256"].lower(), entry["name"], entry["role"], "config"
                )
        for token, name, role in env_tokens(config, env):
            self.registry.register(digest(token), name, role, "env")

    async def load(self, store: Store, clock: Callable[[], datetime] = utc_now) -> None:
        """After migrations: stored tokens, revocations, logged-out sessions, first-run token."""
        self.registry.attach(store, clock)
        revoked = self.registry.load_rows(await store.run(load_token_rows))
        await self.sessions.load(store, clock)
        if not self.enabled or self.registry.has_admin():
            return
        # No admin declared: use (or create) the first-run token so the server is usable
        # at once, yet nothing is open without credentials.
        token, _ = read_or_create_secret(self.token_file, 24, "auth.token_file")
        if digest(token) in revoked:
            token = write_secret(self.token_file, 24, "auth.token_file")
        self.registry.register(digest(token), "first-run-admin", "admin", "first-run")
        self.first_run_token = token

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

    def new_session(self, identity: Identity) -> dict[str, Any]:
        return self.sessions.new_session(identity)

    async def end_session(self, identity: Identity) -> None:
        await self.sessions.end(identity)

    def origin_allowed(self, origin: str, host: str, scheme: str) -> bool:
        return self.origins.allowed_for(origin, host, scheme)

    def still_valid(self, identity: Identity) -> bool:
        """Whether a request admitted as ``identity`` would still be admitted now."""
        if not self.enabled:
            return True
        if identity.session_id and identity.session_id in self.sessions.revoked:
            return False
        return self.registry.active(identity.token_id)

    def issue_login_code(self, code: str | None = None) -> str | None:
        """A one-time code for the first-run admin token (the start-up link), if in use;
        ``code`` adopts one issued by the parent of worker processes instead."""
        if self.first_run_token is None:
            return None
        if code is not None:
            self.login_codes.adopt(code, digest(self.first_run_token))
            return code
        return self.login_codes.issue(digest(self.first_run_token))

    # -- token administration ----------------------------------------------------------
    def add_token(self, token: str, name: str, role: str) -> None:
        self.registry.add_token(token, name, role)

    def tokens(self) -> list[TokenInfo]:
        return self.registry.tokens()

    async def token_list(self) -> list[dict[str, Any]]:
        return await self.registry.token_list()

    async def create_token(self, name: Any, role: Any, actor: str) -> tuple[str, TokenInfo]:
        return await self.registry.create_token(name, role, actor)

    async def revoke_token(self, token_id: str, actor: str) -> TokenInfo:
        return await self.registry.revoke_token(token_id, actor)
