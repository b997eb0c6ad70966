"""Who may open a live stream: one admission decision for both transports.

:func:`admit` runs the whole sequence before a WebSocket upgrade or the first byte of an
SSE stream, in this order, and stops at the first refusal:

1. rate limit: connection attempts per client address (429 ``too_many_attempts``), then
   failed authentications from it (429 ``too_many_failures``);
2. origin: a foreign ``Origin`` (403 ``forbidden_origin``), before any ambient cookie is read;
3. identity: no valid credentials (401 ``unauthorized``);
4. role: a role that may not watch (403 ``forbidden``);
5. filter: a bad ``?types=`` (400 ``invalid_types``);
6. per-identity cap (429 ``too_many_connections``);
7. ``realtime.max_connections`` (503 ``server_full``, ``Retry-After``);
8. the server is stopping (503 ``shutting_down``, ``Retry-After``).

It returns an :class:`Admission` or a :class:`Refusal`. A refusal is a domain error: the SSE
handler raises it (``BaseHandler.write_error`` renders it), the WebSocket handler writes the
same status, headers and JSON envelope instead of the 101. A refusal found only after the
upgrade (a race for the last slot, credentials revoked during the handshake) is rendered as
the WebSocket close code :attr:`Refusal.close_code` (SSE: ``event: close`` with that code).
docs/protocol.md has the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import tornado.web

from ..errors import DomainError
from ..realtime.messages import CLOSE_GOING_AWAY, CLOSE_POLICY, CLOSE_TRY_AGAIN
from ..tokens import Identity
from .base import ApiError, auth_failure_wait, client_address, identify
from .streams import parse_types

if TYPE_CHECKING:
    from ..app import QuotaApp

#: The WebSocket close code a refusal stands for once the connection is already open.
CLOSE_CODES = {401: CLOSE_POLICY, 403: CLOSE_POLICY, 429: CLOSE_TRY_AGAIN, 503: CLOSE_TRY_AGAIN}


class Refusal(DomainError):
    """Why a stream is not admitted: an HTTP status, code, message and headers."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message, code=code, status=status, headers=headers)

    @property
    def close_code(self) -> int:
        if self.code == "shutting_down":
            return CLOSE_GOING_AWAY
        return CLOSE_CODES.get(self.status, CLOSE_POLICY)


@dataclass(frozen=True, slots=True)
class Admission:
    """An admitted stream: who it is, and the event types it asked for (None: all)."""

    identity: Identity
    types: frozenset[str] | None


def server_full() -> Refusal:
    return Refusal(503, "server_full", "too many live connections", {"Retry-After": "5"})


def admit(
    app: QuotaApp, handler: tornado.web.RequestHandler, roles: frozenset[str]
) -> Admission | Refusal:
    """Decide whether ``handler``'s request may open a live stream (see the module doc)."""
    request = handler.request
    wait = app.limiter.attempt(client_address(handler))
    if wait is not None:
        return Refusal(
            429, "too_many_attempts", "too many connection attempts", {"Retry-After": str(wait)}
        )
    wait = auth_failure_wait(handler, app)
    if wait is not None:
        return Refusal(
            429,
            "too_many_failures",
            "too many failed authentications from this address",
            {"Retry-After": str(wait)},
        )
    # A foreign page is refused before its (ambient) cookie is even looked at.
    origin = request.headers.get("Origin")
    if origin is not None and not app.auth.origin_allowed(origin, request.host, request.protocol):
        return Refusal(403, "forbidden_origin", "origin not allowed")
    identity = identify(handler, app)
    if identity is None:
        return Refusal(
            401,
            "unauthorized",
            "credentials required",
            {"WWW-Authenticate": 'Bearer realm="quotaserver"'},
        )
    if not identity.allowed(roles):
        return Refusal(403, "forbidden", "this role may not use this route")
    try:
        types = parse_types(handler.get_query_argument("types", None), app.stream_types())
    except ApiError as exc:
        return Refusal(exc.status, exc.code, exc.message)
    refusal = app.connection_refusal(identity)
    if refusal:
        return Refusal(429, "too_many_connections", refusal)
    if app.hub.full:
        return server_full()
    if app.stopped:  # a keep-alive connection can still ask after close_all
        return Refusal(503, "shutting_down", "the server is shutting down", {"Retry-After": "5"})
    return Admission(identity, types)
