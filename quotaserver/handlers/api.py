"""The quota API for services: check, consume, a user's status, health."""

from __future__ import annotations

import logging
import math
from typing import Any

from ..probes import PATIENCE
from ..quota import Decision
from ..text import hidden_character
from .base import SERVICE, ApiError, BaseHandler

REQUEST_FIELDS = {"user", "command_type", "count"}
#: Longest /api/health waits for a fresh database probe: under the 1 s that load balancers
#: are told to allow (docs/deployment.md), with room for the rest of the request.
HEALTH_BUDGET = 0.5


def validate_username(value: Any, max_length: int, field: str = "user") -> str:
    if not isinstance(value, str):
        raise ApiError(400, "invalid_field", f"{field} must be a string")
    if not value.strip():
        raise ApiError(400, "invalid_field", f"{field} must not be empty")
    if len(value) > max_length:
        raise ApiError(400, "invalid_field", f"{field} is longer than {max_length} characters")
    if not (value.isascii() and value.isprintable()) and any(
        ord(c) < 32 or ord(c) == 127 for c in value
    ):
        raise ApiError(400, "invalid_field", f"{field} must not contain control characters")
    refuse_hidden(value, field)
    return value


def refuse_hidden(value: str, field: str) -> None:
    """400 invalid_field for a name with an invisible or bidirectional character."""
    hidden = hidden_character(value)
    if hidden:
        raise ApiError(
            400,
            "invalid_field",
            f"{field} must not contain invisible or bidirectional characters ({hidden})",
        )


def validate_count(value: Any, max_count: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, "invalid_field", "count must be an integer")
    if value <= 0:
        raise ApiError(400, "invalid_field", "count must be positive")
    if value > max_count:
        raise ApiError(400, "invalid_field", f"count must be at most {max_count}")
    return value


class QuotaRequestHandler(BaseHandler):
    roles = SERVICE
    consume = False

    def parse(self) -> tuple[str, str, int]:
        body = self.json_body(REQUEST_FIELDS, required=("user", "command_type"))
        config = self.app.config
        user = validate_username(body["user"], config["quotas.max_username_length"])
        command_type = body["command_type"]
        if not isinstance(command_type, str) or not command_type:
            raise ApiError(400, "invalid_field", "command_type must be a non-empty string")
        refuse_hidden(command_type, "command_type")
        count = validate_count(body.get("count", 1), config["quotas.max_count"])
        return user, command_type, count

    async def post(self) -> None:
        user, command_type, count = self.parse()
        service = self.app.quota
        # An unknown command type is the service's UnknownCommandType, rendered with
        # quotas.unknown_command_status by BaseHandler.write_error.
        if self.consume:
            decision = await service.consume(user, command_type, count)
        else:
            decision = await service.check(user, command_type, count)
        self.respond(decision)

    def respond(self, decision: Decision) -> None:
        now = decision.at  # the service's clock, so resets are exact under a test clock
        tightest = decision.tightest()
        if tightest is not None:
            period, status = tightest
            self.set_header("RateLimit-Limit", str(status.limit))
            self.set_header("RateLimit-Remaining", str(status.remaining))
            reset = max(0, math.ceil((status.resets_at - now).total_seconds()))
            self.set_header("RateLimit-Reset", str(reset))
        if decision.allowed:
            return self.send_json(decision.to_json())
        if decision.reason == "system_overloaded":
            self.access_log_level = logging.INFO  # shedding load is routine, not an error
            self.set_header("Retry-After", "5")
            return self.send_json(decision.to_json(), status=503)
        period = decision.violation["period"]
        window = decision.periods[period]
        reset = max(1, math.ceil((window.resets_at - now).total_seconds()))
        self.set_header("Retry-After", str(reset))
        self.set_header("RateLimit-Limit", str(window.limit))
        self.set_header("RateLimit-Remaining", str(window.remaining))
        self.set_header("RateLimit-Reset", str(reset))
        self.send_json(decision.to_json(), status=429)


class CheckHandler(QuotaRequestHandler):
    """POST /api/quotas/check: would this be admitted? No side effects."""


class ConsumeHandler(QuotaRequestHandler):
    """POST /api/quotas/consume: admit and count, or deny and record a violation."""

    consume = True


class UserStatusHandler(BaseHandler):
    """GET /api/quotas/users/{username}"""

    roles = frozenset({"service", "viewer"})

    async def get(self, username: str) -> None:
        username = validate_username(
            username, self.app.config["quotas.max_username_length"], "username"
        )
        status = await self.app.quota.user_status(username)
        if status is None:
            raise ApiError(404, "unknown_user", "no such user")
        self.send_json(status)


class HealthHandler(BaseHandler):
    """GET /api/health: the summary for load balancers (public: no version, nothing sensitive).

    It asks the database again, but answers within :data:`HEALTH_BUDGET` whatever the
    database does (quotaserver.probes). The version is in the authenticated ``/api/ws/health``.
    """

    roles = None

    async def get(self) -> None:
        reachable = await self.app.probe.fresh(HEALTH_BUDGET)
        body = {
            "status": "ok" if reachable else "degraded",
            # Public: no version, no error text (the authenticated /api/ws/health has both).
            "database": {"reachable": reachable},
        }
        self.send_json(body, status=200 if reachable else 503)


class LiveHandler(BaseHandler):
    """GET /api/health/live: the process runs and its IOLoop answers (Kubernetes liveness).

    Nothing else is looked at: restarting a process because its database is down would
    not bring the database back.
    """

    roles = None

    def get(self) -> None:
        self.send_json({"status": "ok"})


class ReadyHandler(BaseHandler):
    """GET /api/health/ready: should this instance get traffic? From the last probes only.

    503 while the database does not answer, while the backplane of a clustered instance is
    down, or while the server stops; plugin failures are reported but do not make the
    instance unready (consumes still work, and every instance would fail alike).
    """

    roles = None

    def get(self) -> None:
        app = self.app
        probe = app.probe
        probe.refresh(older_than=PATIENCE)  # in the background: this answer does not wait
        database = probe.answering
        backplane = app.backplane.connected or not app.clustered
        failing = sum(1 for f in app.hooks.failures.values() if f.failing) + sum(
            1 for source in app.scheduler.sources.values() if not source.healthy
        )
        ready = app.running and database and backplane
        self.send_json(
            {
                "status": "ready" if ready else "not_ready",
                "checks": {
                    "running": app.running,
                    "database": database,
                    "backplane": backplane,
                    "plugins_failing": failing,
                },
            },
            status=200 if ready else 503,
        )
