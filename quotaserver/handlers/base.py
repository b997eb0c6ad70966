"""The one base handler: authentication, JSON in and out, the error envelope, headers.

Every error leaves as ``{"error": {"code": "...", "message": "..."}}`` with a 4xx/5xx
status; a traceback never reaches a client.

Access control is declared on the handler class and enforced in :meth:`BaseHandler.prepare`
before any handler code runs::

    class RulesHandler(BaseHandler):
        roles = ADMIN                   # every method: admin only (the default)
        method_roles = {"GET": VIEWER}  # ...but viewers may read

``roles = None`` makes a route public. Admin is always allowed. ``page = True`` marks an
HTML page: a caller without credentials is redirected to ``/login?next=<path>`` instead of
getting a 401. tests/test_security.py walks the route table and checks every route and
method against these declarations.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import time
from collections.abc import Awaitable, Collection, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlencode

import tornado.escape
import tornado.web

from ..db import DatabaseError
from ..errors import DomainError, error_id
from ..sessions import SESSION_COOKIE
from ..tokens import ANONYMOUS_ADMIN, Identity

if TYPE_CHECKING:
    from ..app import QuotaApp

log = logging.getLogger(__name__)

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)

ADMIN = frozenset({"admin"})
VIEWER = frozenset({"viewer"})
SERVICE = frozenset({"service"})
READERS = frozenset({"viewer", "service"})


class ApiError(DomainError):
    """A refusal decided by a handler (bad parameter, wrong role...): a :class:`DomainError`
    like those the services raise, rendered by the same :meth:`BaseHandler.write_error`."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message, code=code, status=status, headers=headers)


def error_envelope(exc: BaseException | None, status: int, reason: str) -> tuple[int, dict, dict]:
    """``(status, headers, body)`` of the JSON error envelope for ``exc``: the one place a
    domain error becomes HTTP. Anything that is not a domain error or a 4xx is a bare 500."""
    if isinstance(exc, DatabaseError):
        # The details name the database's host and port: the log has them, with this id.
        status, headers = exc.status, exc.headers
        body = {"code": exc.code, "message": exc.public_message, "error_id": error_id(exc)}
        return status, headers, {"error": body}
    if isinstance(exc, DomainError):
        status, headers = exc.status, exc.headers
        code, message = exc.code, exc.message
    elif status < 500:
        headers = {}
        code = STATUS_CODES.get(status, "error")
        log_message = exc.log_message if isinstance(exc, tornado.web.HTTPError) else None
        message = log_message or reason
    else:
        body = {"code": "internal_error", "message": "internal server error"}
        if exc is not None:
            body["error_id"] = error_id(exc)  # the log line with the traceback has it too
        return 500, {}, {"error": body}
    return status, headers, {"error": {"code": code, "message": message}}


def write_error_envelope(
    handler: tornado.web.RequestHandler, status_code: int, exc_info: Any = None
) -> None:
    """Finish ``handler`` with the JSON error envelope: the ``write_error`` of every handler
    class, API and static files alike, so no route answers an HTML error page."""
    exc = (exc_info or (None, None, None))[1]
    status, headers, body = error_envelope(exc, status_code, handler._reason)
    if status != status_code:
        handler.set_status(status)
    for name, value in headers.items():
        handler.set_header(name, value)
    handler.set_header("Content-Type", "application/json; charset=utf-8")
    handler.finish(tornado.escape.json_encode(body))


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
    421: "misdirected_request",
    429: "too_many_requests",
    503: "unavailable",
}


STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def security_headers(handler: tornado.web.RequestHandler, cache: bool = False) -> None:
    handler.clear_header("Server")  # no version banner for scanners
    handler.set_header("Content-Security-Policy", CSP)
    handler.set_header("X-Content-Type-Options", "nosniff")
    handler.set_header("X-Frame-Options", "DENY")
    handler.set_header("Referrer-Policy", "same-origin")
    if not cache:
        handler.set_header("Cache-Control", "no-store")


def request_summary(handler: tornado.web.RequestHandler) -> str:
    """Method, path and address for logs: never the query string (a login URL has a token)."""
    request = handler.request
    return f"{request.method} {request.path} ({request.remote_ip})"


def log_handler_exception(
    handler: tornado.web.RequestHandler,
    typ: type[BaseException] | None,
    value: BaseException | None,
    tb: TracebackType | None,
) -> None:
    """Tornado's logging of handler errors without the request repr (it holds the URI)."""
    if isinstance(value, DatabaseError):
        log.warning(
            "503 %s: %s (error %s)", request_summary(handler), value.message, error_id(value)
        )
    elif isinstance(value, DomainError):
        pass  # a refusal the client is told about; the access log has the status
    elif isinstance(value, tornado.web.HTTPError):
        if value.log_message:
            log.warning("%d %s: %s", value.status_code, request_summary(handler), value.log_message)
    else:
        ident = error_id(value) if value is not None else "-"
        where = _raised_at(tb)
        first = _tracebacks.first_in_window((typ, where))
        log.error(
            "uncaught exception %s (error %s)%s",
            request_summary(handler),
            ident,
            "" if first else f": {typ.__name__ if typ else '?'} at {where}, traceback as before",
            exc_info=(typ, value, tb) if first else None,
        )


class _Once:
    """Whether a key was seen in the last ``window`` seconds: one client hitting the same
    bug in a loop gets one traceback a minute, and one short line per request after it
    (it was about 1 MB/s of ERROR lines)."""

    def __init__(self, window: float = 60.0, size: int = 256):
        self.window, self.size = window, size
        self._seen: dict[Any, float] = {}

    def first_in_window(self, key: Any) -> bool:
        now = time.monotonic()
        last = self._seen.get(key)
        if last is not None and now - last < self.window:
            return False
        if len(self._seen) >= self.size:  # bounded: many distinct bugs at once
            self._seen.clear()
        self._seen[key] = now
        return True


_tracebacks = _Once()


def _raised_at(tb: TracebackType | None) -> str:
    """``file:line`` of the innermost frame: where the exception was raised."""
    if tb is None:
        return "?"
    while tb.tb_next is not None:
        tb = tb.tb_next
    return f"{os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"


def parse_json(raw: bytes | str) -> Any:
    """Decode JSON from a client; ValueError unless it is data the server can handle.

    Beyond syntax errors this refuses what ``json.loads`` accepts but the server cannot
    handle: nesting deep enough to exhaust the stack, and unpaired surrogates
    (``"\\ud800"``), which cannot be stored or sent back as UTF-8.
    """
    try:
        value = json.loads(raw)
        # A lone surrogate can only come from a \u escape or from non-ASCII input (json
        # decodes bytes with surrogatepass); otherwise re-encoding finds it anywhere.
        if not raw.isascii() or ("\\u" if isinstance(raw, str) else b"\\u") in raw:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeError, RecursionError) as exc:
        raise ValueError(str(exc)) from None
    return value


def control_character(value: Any) -> bool:
    """True if a string anywhere in ``value`` (keys included) has a C0 control or DEL."""
    if isinstance(value, str):
        if value.isascii() and value.isprintable():  # the common case, in C
            return False
        return any(ord(c) < 32 or ord(c) == 127 for c in value)
    if isinstance(value, dict):
        return any(control_character(k) or control_character(v) for k, v in value.items())
    if isinstance(value, list):
        return any(control_character(v) for v in value)
    return False


def json_body(
    body: Any,
    fields: Collection[str] | None = None,
    required: Collection[str] = (),
    controls_checked: bool = False,
) -> dict[str, Any]:
    """Check a decoded request body: a JSON object (400 ``invalid_json``), with no field
    outside ``fields`` (400 ``unknown_field``; None allows any), every ``required`` one
    present (400 ``missing_field``) and no control character in any string (400
    ``invalid_field``; ``controls_checked``: :func:`no_controls_possible` said none can
    be there). Values are the handler's to validate."""
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    if fields is not None:
        unknown = set(body) - set(fields) - set(required)
        if unknown:
            raise ApiError(400, "unknown_field", f"unknown field {sorted(unknown)[0]!r}")
    for name in required:
        if name not in body:
            raise ApiError(400, "missing_field", f"{name} is required")
    if controls_checked:
        return body
    for name, value in body.items():
        if control_character(value):
            raise ApiError(400, "invalid_field", f"{name} must not contain control characters")
    return body


def no_controls_possible(raw: bytes) -> bool:
    """Whether no string decoded from the JSON text ``raw`` can hold a C0 control or DEL.

    JSON refuses raw control characters inside strings, so one can only come from an
    escape (a backslash) or be DEL itself; UTF-8 never encodes other characters with bytes
    below 0x80. A body with neither needs no walk through its strings."""
    return b"\\" not in raw and b"\x7f" not in raw


def unauthorized() -> ApiError:
    return ApiError(
        401,
        "unauthorized",
        "credentials required",
        {"WWW-Authenticate": 'Bearer realm="quotaserver"'},
    )


def client_address(handler: tornado.web.RequestHandler) -> str:
    return handler.request.remote_ip or "?"


def auth_failure_wait(handler: tornado.web.RequestHandler, app: QuotaApp) -> int | None:
    """Seconds this client must wait after too many failed authentications, or None."""
    return app.auth.failures.retry_after(client_address(handler))


def identify(handler: tornado.web.RequestHandler, app: QuotaApp) -> Identity | None:
    """Bearer token first, then the browser session cookie.

    A credential that is presented and refused counts against the client's address.
    """
    auth = app.auth
    if not auth.enabled:
        return ANONYMOUS_ADMIN
    header = handler.request.headers.get("Authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        identity = auth.authenticate(token.strip()) if scheme.lower() == "bearer" else None
        if identity is None:
            auth.failures.failed(client_address(handler))
        return identity
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
    #: Set by :meth:`json_body`: no string of the body can hold a control character.
    controls_checked = False
    #: Per-method exceptions to ``roles``, e.g. ``{"GET": VIEWER}``.
    method_roles: ClassVar[Mapping[str, frozenset[str] | None]] = {}
    #: An HTML page: strangers are sent to the login page rather than given a 401.
    page: ClassVar[bool] = False
    app: QuotaApp
    identity: Identity | None

    def roles_for(self, method: str) -> frozenset[str] | None:
        """The roles admitted for ``method`` (None: public).

        ``self.roles`` may also be set per request in ``initialize()``; the security tests
        read this method on a handler built for each route and method.
        """
        return self.method_roles.get(method, self.roles)

    def initialize(self, app: QuotaApp) -> None:
        self.app = app
        self.identity = None

    def set_default_headers(self) -> None:
        security_headers(self)

    def set_cookie(self, name: str, value: str | bytes, *args: Any, **kwargs: Any) -> None:
        # Tornado sets the _xsrf cookie with the static xsrf_cookie_kwargs: make it (and any
        # other cookie) Secure whenever the request came over HTTPS, directly or through a
        # proxy with server.xheaders, exactly like the session cookie.
        if self.request.protocol == "https":
            kwargs["secure"] = True
        super().set_cookie(name, value, *args, **kwargs)

    def refuse_after_failures(self) -> None:
        """429 for a client past the failed-authentication limit (before any credential)."""
        wait = auth_failure_wait(self, self.app)
        if wait is not None:
            raise ApiError(
                429,
                "too_many_failures",
                "too many failed authentications from this address",
                {"Retry-After": str(wait)},
            )

    def check_xsrf(self) -> None:
        """403 unless the request carries the XSRF token of its cookie session: the token
        must match the ``_xsrf`` cookie (Tornado's check) and, for a session, the token the
        session was issued with (a cookie planted by someone else does not do)."""
        try:
            self.check_xsrf_cookie()
        except tornado.web.HTTPError:
            raise ApiError(403, "xsrf", "missing or invalid XSRF token") from None
        identity = self.identity
        if identity is not None and identity.session_id:
            _version, raw, _when = self._get_raw_xsrf_token()
            if not hmac.compare_digest(raw.hex(), identity.xsrf or ""):
                raise ApiError(403, "xsrf", "the XSRF token is not this session's")

    def session_xsrf_token(self) -> str:
        """The XSRF token for a page: the session's own (the ``_xsrf`` cookie is set to it
        again if a browser lost or replaced it), else Tornado's."""
        identity = self.identity
        if identity is not None and identity.xsrf:
            _version, raw, _when = self._get_raw_xsrf_token()
            if raw.hex() != identity.xsrf:
                # Tornado (re)sets the cookie for a token it did not read from one.
                self._raw_xsrf_token = (None, bytes.fromhex(identity.xsrf), time.time())
        return self.xsrf_token.decode("ascii")

    def _request_summary(self) -> str:
        return request_summary(self)

    def log_exception(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        log_handler_exception(self, typ, value, tb)

    def prepare(self) -> None:
        self.refuse_after_failures()
        limit = self.app.config["server.max_body_size"]
        if len(self.request.body or b"") > limit:
            raise ApiError(413, "payload_too_large", f"the body is larger than {limit} bytes")
        request = self.request
        if request.method in ("POST", "PUT", "PATCH", "DELETE") and not request.headers.get(
            "Authorization"
        ):
            # Without a bearer token, a browser may be carrying ambient credentials (a
            # cookie, or none at all when auth is disabled): refuse foreign pages outright.
            # Sec-Fetch-Site covers a browser that leaves Origin out.
            origin = request.headers.get("Origin")
            foreign = origin is not None and not self.app.auth.origin_allowed(
                origin, request.host, request.protocol
            )
            if foreign or request.headers.get("Sec-Fetch-Site", "").lower() == "cross-site":
                raise ApiError(403, "forbidden_origin", "origin not allowed")
        self.identity = identify(self, self.app)
        roles = self.roles_for(self.request.method or "GET")
        if roles is None:
            return
        if self.identity is None:
            if self.page and self.request.method in ("GET", "HEAD"):
                target = self.request.path
                if self.request.query:
                    target += "?" + self.request.query
                # Tornado skips the method once prepare() has finished the response.
                return self.redirect("/login?" + urlencode({"next": target}))
            counting = self.app.auth.failures.counting(client_address(self))
            if counting is not None:
                # A refused credential: answer once the cluster has counted it (Tornado
                # awaits what prepare returns), so the next guess anywhere meets the count.
                return self._unauthorized_after(counting)
            raise unauthorized()
        if not self.identity.allowed(roles):
            raise ApiError(403, "forbidden", "this role may not use this route")
        # A bearer token is not an ambient credential: only cookie sessions need XSRF.
        if self.identity.session_id and self.request.method in STATE_CHANGING:
            self.check_xsrf()

    async def _unauthorized_after(self, counting: Awaitable[Any]) -> None:
        await counting
        raise unauthorized()

    @property
    def actor(self) -> str:
        return self.identity.name if self.identity else "anonymous"

    # -- JSON --------------------------------------------------------------------------
    def json_body(
        self,
        fields: Collection[str] | None = None,
        required: Collection[str] = (),
        *,
        empty_ok: bool = False,
    ) -> dict[str, Any]:
        """The request body as a JSON object, checked in one place (see :func:`json_body`)."""
        if empty_ok and not self.request.body:
            return json_body({}, fields, required)
        ctype = self.request.headers.get("Content-Type", "")
        if ctype.split(";")[0].strip().lower() != "application/json":
            raise ApiError(415, "unsupported_media_type", "Content-Type must be application/json")
        raw = self.request.body or b""
        try:
            body = parse_json(raw)
        except ValueError:  # UnicodeDecodeError is one too
            raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
        self.controls_checked = no_controls_possible(raw)
        return json_body(body, fields, required, self.controls_checked)

    def send_json(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(json.dumps(obj, separators=(",", ":")))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """Every error response, domain errors included (see :func:`error_envelope`)."""
        write_error_envelope(self, status_code, kwargs.get("exc_info"))


class MisdirectedHandler(BaseHandler):
    """Every request whose Host the server does not answer to (see quotaserver.origins)."""

    roles = None

    def prepare(self) -> None:
        raise ApiError(421, "misdirected_request", "this server does not answer to that host")


class NotFoundHandler(BaseHandler):
    """The default route: a JSON 404 for everything unknown."""

    roles = None

    def prepare(self) -> None:
        raise ApiError(404, "not_found", "no such route")


class StaticHandler(tornado.web.StaticFileHandler):
    """Static files with the same security headers (and no version banner), the JSON error
    envelope and the one-line error logging of the API, gzip-compressed for browsers that
    accept it.

    Compression is on here only: the application keeps ``compress_response`` off, because
    its JSON answers carry secrets (a new token) next to attacker-chosen text, which is what
    BREACH needs, and SSE must not wait for a compressor. The page's scripts and styles are
    public and fixed. A range request is answered uncompressed (a gzip stream has no byte
    ranges of the file).
    """

    def set_default_headers(self) -> None:
        security_headers(self, cache=True)

    async def _execute(
        self, transforms: list[tornado.web.OutputTransform], *args: bytes, **kwargs: bytes
    ) -> None:
        if "Range" not in self.request.headers and not any(
            isinstance(t, tornado.web.GZipContentEncoding) for t in transforms
        ):
            transforms = [*transforms, tornado.web.GZipContentEncoding(self.request)]
        await super()._execute(transforms, *args, **kwargs)

    def _request_summary(self) -> str:
        return request_summary(self)

    async def get(self, path: str, include_body: bool = True) -> None:
        # A NUL or another control character cannot name a file: without this check
        # os.stat raises ValueError deep in Tornado (a 500 and a traceback per request).
        if control_character(path):
            raise ApiError(400, "invalid_path", "the path contains a control character")
        await super().get(path, include_body)

    def log_exception(
        self,
        typ: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        log_handler_exception(self, typ, value, tb)

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        write_error_envelope(self, status_code, kwargs.get("exc_info"))
