"""Which Host values the server answers to (the defence against DNS rebinding), and
which Origins may use ambient credentials (:class:`OriginPolicy`).

A page on ``http://rebind.test`` whose name is made to resolve to this server sends
``Host: rebind.test`` and ``Origin: http://rebind.test``: the two agree, so an Origin check
alone passes. The Host itself must therefore be one of ours, and it is checked for every
request before any handler runs (:class:`HostGuard`): loopback names always pass, the hosts
of ``server.public_origins`` pass, and with ``server.public_origins`` empty any Host passes
only while authentication is enabled (without credentials a rebound page gets nothing).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import tornado.httputil
import tornado.routing
import tornado.web

from .config import is_loopback_host


class HostPolicy:
    def __init__(self, public_origins: Iterable[str], auth_enabled: bool):
        self.public_hosts = frozenset(
            (urlsplit(o).hostname or "").rstrip(".") for o in public_origins
        )
        self.any_host = auth_enabled and not self.public_hosts

    def allowed(self, host_name: str) -> bool:
        """``host_name`` is the Host header without its port, lower-cased."""
        name = host_name.strip("[]").rstrip(".")
        return self.any_host or is_loopback_host(name) or name in self.public_hosts


class OriginPolicy:
    """Which ``Origin`` may use ambient credentials (a cookie) and open live streams."""

    def __init__(self, allowed: Iterable[str]):
        self.allowed = frozenset(o.rstrip("/") for o in allowed)

    def allowed_for(self, origin: str, host: str, scheme: str) -> bool:
        """Exact match with the server's own origin or an allow-listed or public one.

        ``host`` has passed :class:`HostPolicy` before any handler ran, so a rebound name
        (``Host: rebind.test`` with ``Origin: http://rebind.test``) never gets this far.
        """
        origin = origin.rstrip("/")
        return origin == f"{scheme}://{host}" or origin in self.allowed


class HostGuard(tornado.routing.Router):
    """Routes a request with a foreign Host to ``refusal`` (421) instead of the app."""

    def __init__(
        self,
        app: tornado.web.Application,
        policy: HostPolicy,
        refusal: type[tornado.web.RequestHandler],
        refusal_kwargs: dict[str, Any],
    ):
        self.app = app
        self.policy = policy
        self.refusal = refusal
        self.refusal_kwargs = refusal_kwargs

    def find_handler(
        self, request: tornado.httputil.HTTPServerRequest, **kwargs: Any
    ) -> tornado.httputil.HTTPMessageDelegate | None:
        if self.policy.allowed(request.host_name):
            return self.app.find_handler(request, **kwargs)
        return self.app.get_handler_delegate(request, self.refusal, self.refusal_kwargs)
