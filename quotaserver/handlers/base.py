"""The one base handler: authentication, JSON in and out, the error envelope, headers.

Every error leaves as ``{"error": {"code": "...", "message": "..."}}`` with a 4xx/5xx
status; a traceback never reaches a client.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any, ClassVar

import tornado.escape
import tornado.web

from ..auth import ANONYMOUS_ADMIN, SESSION_COOKIE, Identity

if TYPE_CHECKING:
    from ..app import QuotaApp

log = logging.getLogger(__name__)

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self' ws: wss:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)

ADMIN = frozenset({"admin"})
VIEWER = frozenset({"viewer"})
SERVICE = frozenset({"service"})
READERS = frozenset({"viewer", "service"})


class ApiError(tornado.web.HTTPError):
    """An error with a machine-readable code, rendered in the JSON envelope."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(status, reason=None)
        self.code = code
        self.message = message
        self.headers = headers or {}


STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    503: "unavailable",
}


def security_headers(handler: tornado.web.RequestHandler) -> None:
    handler.set_header("Content-Security-Policy", CSP)
    handler.set_header("X-Content-Type-Options", "nosniff")
    handler.set_header("X-Frame-Options", "DENY")
    handler.set_header("Referrer-Policy", "same-origin")
    handler.set_header("Cache-Control", "no-store")


def identify(handler: tornado.web.RequestHandler, app: QuotaApp) -> Identity | None:
    """Bearer token first, then the browser session cookie."""
    auth = app.auth
    if not auth.enabled:
        return ANONYMOUS_ADMIN
    header = handler.request.headers.get("Authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return None
        return auth.authenticate(token.strip())
    raw = handler.get_signed_cookie(SESSION_COOKIE, max_age_days=auth.session_lifetime / 86400 + 1)
    if raw is None:
        return None
    try:
        payload = json.loads(raw)
    except ValueError:
        return None
    return auth.session_identity(payload)


class BaseHandler(tornado.web.RequestHandler):
    """Routes declare ``roles`` (admin is always allowed); ``None`` means public."""

    roles: ClassVar[frozenset[str] | None] = ADMIN
    app: QuotaApp
    identity: Identity | None

    def initialize(self, app: QuotaApp) -> None:
        self.app = app
        self.identity = None

    def set_default_headers(self) -> None:
        security_headers(self)

    def check_xsrf(self) -> None:
        """403 unless the request carries the XSRF token of its cookie session."""
        try:
            self.check_xsrf_cookie()
        except tornado.web.HTTPError:
            raise ApiError(403, "xsrf", "missing or invalid XSRF token") from None

    def prepare(self) -> None:
        self.identity = identify(self, self.app)
        if self.roles is None:
            return
        if self.identity is None:
            raise ApiError(
                401,
                "unauthorized",
                "credentials required",
                {"WWW-Authenticate": 'Bearer realm="quotaserver"'},
            )
        if not self.identity.allowed(self.roles):
            raise ApiError(403, "forbidden", "this role may not use this route")
        # A bearer token is not an ambient credential: only cookie sessions need XSRF.
        if self.identity.session_id and self.request.method in ("POST", "PUT", "PATCH", "DELETE"):
            self.check_xsrf()

    @property
    def actor(self) -> str:
        return self.identity.name if self.identity else "anonymous"

    # -- JSON --------------------------------------------------------------------------
    def json_body(self) -> dict[str, Any]:
        """The request body as a JSON object; 4xx for anything else."""
        ctype = self.request.headers.get("Content-Type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")
        try:
            body = json.loads(self.request.body or b"")
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_json", "the body must be a JSON object")
        return body

    def send_json(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(obj, separators=(",", ":")))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError):
            code, message = exc.code, exc.message
            for name, value in exc.headers.items():
                self.set_header(name, value)
        elif isinstance(exc, tornado.web.HTTPError) and status_code < 500:
            code = STATUS_CODES.get(status_code, "error")
            message = exc.log_message or self._reason
        elif status_code < 500:
            code, message = STATUS_CODES.get(status_code, "error"), self._reason
        else:
            code, message = "internal_error", "internal server error"
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(tornado.escape.json_encode({"error": {"code": code, "message": message}}))


class NotFoundHandler(BaseHandler):
    """The default route: a JSON 404 for everything unknown."""

    roles = None

    def prepare(self) -> None:
        raise ApiError(404, "not_found", "no such route")
