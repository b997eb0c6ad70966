"""Browser sessions: exchange a token for a signed cookie (login), and log out."""

from __future__ import annotations

import json
from urllib.parse import quote, urlsplit

from ..auth import SESSION_COOKIE
from .base import VIEWER, BaseHandler

DEFAULT_NEXT = "/admin/quotas"
# Kept as they are in a path or query; everything else (spaces, non-ASCII) is escaped.
_URL_SAFE = "!#$%&'()*+,-./:;=?@[]_~"


def safe_next(value: str | None) -> str:
    """A same-site absolute path to go to after login: never an open redirect.

    Browsers drop tabs and newlines from URLs and read ``\\`` as ``/``, so ``/\\evil``
    or ``/<TAB>/evil`` would become ``//evil`` (another host): anything with a control
    character or a backslash falls back to the dashboard.
    """
    if not value or not value.startswith("/") or value.startswith("//"):
        return DEFAULT_NEXT
    if "\\" in value or any(ord(c) < 32 or ord(c) == 127 for c in value):
        return DEFAULT_NEXT
    target = quote(value, safe=_URL_SAFE)  # a Location header must be ASCII
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//"):
        return DEFAULT_NEXT
    return target


class LoginHandler(BaseHandler):
    """GET /login shows the form (or exchanges ``?token=``); POST /login exchanges the form."""

    roles = None

    def get(self) -> None:
        token = self.get_query_argument("token", None)
        if token is not None:
            # The login URL printed at start-up: exchange, then redirect so the token
            # leaves the address bar (and the history).
            return self._exchange(token)
        self._form()

    def post(self) -> None:
        self.check_xsrf()
        self._exchange(self.get_body_argument("token", ""))

    def _exchange(self, token: str) -> None:
        identity = self.app.auth.authenticate(token.strip())
        if identity is None or identity.role not in ("admin", "viewer"):
            self.set_status(401)
            return self._form("That token is not valid for the dashboard.")
        session = self.app.auth.new_session(identity)
        self.set_signed_cookie(
            SESSION_COOKIE,
            json.dumps(session, separators=(",", ":")),
            expires_days=self.app.auth.session_lifetime / 86400,
            httponly=True,
            samesite="Strict",
            # request.protocol follows X-Forwarded-Proto when server.xheaders is on.
            secure=self.request.protocol == "https",
        )
        self.redirect(safe_next(self.get_argument("next", None)))

    def _form(self, error: str | None = None) -> None:
        self.render(
            "login.html",
            error=error,
            next=safe_next(self.get_argument("next", None)),
        )


class LogoutHandler(BaseHandler):
    """POST /logout: end the session and close its live connections (1008)."""

    roles = VIEWER

    async def post(self) -> None:
        if self.identity is not None and self.identity.session_id:
            await self.app.auth.end_session(self.identity)
            self.app.end_identity(session_id=self.identity.session_id)
        self.clear_cookie(SESSION_COOKIE)
        if self.request.headers.get("Accept", "").startswith("application/json"):
            return self.send_json({"logged_out": True})
        self.redirect("/login")
