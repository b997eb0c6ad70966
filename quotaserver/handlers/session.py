"""Browser sessions: exchange a token or a one-time login code for a signed cookie, log out.

Credentials only ever travel in a POST body: ``GET /login`` shows the form and never signs
anyone in, whatever its query string says (a token in a URL ends up in browser history,
proxy logs and Referer headers, and a link could sign a victim in as the attacker). The
start-up link carries a one-time code in its ``#fragment``, which the login page POSTs.
A POST from a foreign origin is refused (BaseHandler.prepare), as is one without the XSRF
token.
"""

from __future__ import annotations

import json
from urllib.parse import quote, urlsplit

from ..sessions import SESSION_COOKIE
from ..tokens import Identity
from .base import VIEWER, BaseHandler, client_address

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
    """GET /login shows the form; POST /login exchanges a token or a login code."""

    roles = None

    def get(self) -> None:
        self._form()

    async def post(self) -> None:
        self.check_xsrf()
        code = self.get_body_argument("code", "").strip()
        if code:
            d = await self.app.auth.login_codes.redeem(code)
            identity = self.app.auth.authenticate_digest(d) if d else None
            if identity is None:
                return self._refused("That sign-in link has expired or was already used.")
        else:
            identity = self.app.auth.authenticate(self.get_body_argument("token", "").strip())
            if identity is None:
                return self._refused("That token is not valid for the dashboard.")
        if identity.role not in ("admin", "viewer"):  # service and metrics tokens cannot
            return self._refused("That token is not valid for the dashboard.")
        self._sign_in(identity)

    def _refused(self, message: str) -> None:
        self.app.auth.failures.failed(client_address(self))
        self.set_status(401)
        self._form(message)

    def _sign_in(self, identity: Identity) -> None:
        # The form's XSRF token (checked above) becomes the session's own.
        _version, raw_xsrf, _when = self._get_raw_xsrf_token()
        session = self.app.auth.new_session(identity, raw_xsrf.hex())
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
    """POST /logout: end the session and, once that has committed, its live streams (1008)."""

    roles = VIEWER

    async def post(self) -> None:
        if self.identity is not None and self.identity.session_id:
            await self.app.auth.end_session(self.identity)
            self.app.end_identity(session_id=self.identity.session_id)
        self.clear_cookie(SESSION_COOKIE)
        if self.request.headers.get("Accept", "").startswith("application/json"):
            return self.send_json({"logged_out": True})
        self.redirect("/login")
