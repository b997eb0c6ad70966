"""The quota API for services: check, consume, refund, a user's status, health."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from ..errors import DomainError
from ..idempotency import HEADER, Replay, RequestKey, parse_key
from ..probes import PATIENCE
from ..quota import BatchItem, BatchResult, Decision, PeriodStatus, tightest_of
from .base import SERVICE, ApiError, BaseHandler, json_body
from .params import validate_command_type, validate_count, validate_username

REQUEST_FIELDS = {"user", "command_type", "count"}
REFUND_FIELDS = {"user", "command_type", "key"}
BATCH_FIELDS = {"decisions"}
BATCH_ITEM_FIELDS = REQUEST_FIELDS | {"key"}  # key: the item's own Idempotency-Key
MAX_BATCH = 500
#: Longest /api/health waits for a fresh database probe: under the 1 s that load balancers
#: are told to allow (docs/deployment.md), with room for the rest of the request.
HEALTH_BUDGET = 0.5


def rate_limit_headers(
    periods: Mapping[str, PeriodStatus], now: datetime, refused: str | None = None
) -> list[tuple[str, str]]:
    """The IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers-09 and later) and the
    deprecated trio of drafts up to -06, all from ``periods`` (so they match the body).

    ``RateLimit-Policy`` lists every limited window (``q`` its limit, ``w`` its length);
    ``RateLimit`` and the trio describe the window that refused, else the one with the least
    remaining; a refusal adds ``Retry-After``, never earlier than that window's reset.
    """
    limited = [(p, s) for p, s in periods.items() if s.limit is not None]
    if not limited:
        return []  # nothing is limited: no policy to state
    period, status = (refused, periods[refused]) if refused is not None else tightest_of(limited)
    reset = math.ceil((status.resets_at - now).total_seconds())
    reset = max(1, reset) if refused is not None else max(0, reset)
    remaining = str(status.remaining)
    headers = [
        ("RateLimit-Policy", _policy(tuple((p, s.limit, s.seconds) for p, s in limited))),
        ("RateLimit", f'"{period}";r={remaining};t={reset}'),
        ("RateLimit-Limit", str(status.limit)),
        ("RateLimit-Remaining", remaining),
        ("RateLimit-Reset", str(reset)),
    ]
    if refused is not None:
        headers.append(("Retry-After", str(reset)))
    return headers


@functools.lru_cache(maxsize=1024)
def _policy(windows: tuple[tuple[str, int, int], ...]) -> str:
    """The RateLimit-Policy value of (period, limit, seconds) windows: the same few shapes
    recur on every consume, so each is formatted once."""
    return ", ".join(f'"{p}";q={limit};w={seconds}' for p, limit, seconds in windows)


class QuotaRequestHandler(BaseHandler):
    roles = SERVICE
    consume = False

    def parse(self) -> tuple[str, str, int]:
        body = self.json_body(REQUEST_FIELDS, required=("user", "command_type"))
        config = self.app.config
        user = validate_username(body["user"], config["quotas.max_username_length"])
        command_type = validate_command_type(body["command_type"])
        count = validate_count(body.get("count", 1), config["quotas.max_count"])
        return user, command_type, count

    def idempotency_key(self, *request: Any) -> RequestKey | None:
        """The request's ``Idempotency-Key`` scoped to the caller's token, if it sent one."""
        raw = self.request.headers.get(HEADER)
        if raw is None:
            return None
        return RequestKey.of(self.identity.token_id, parse_key(raw), *request)

    async def post(self) -> None:
        user, command_type, count = self.parse()
        service = self.app.quota
        # An unknown command type is the service's UnknownCommandType, rendered with
        # quotas.unknown_command_status by BaseHandler.write_error.
        if self.consume:
            key = self.idempotency_key("consume", user, command_type, count)
            answer = await service.consume(user, command_type, count, key)
            if isinstance(answer, Replay):
                return self.replay(answer)
            decision = answer
        else:
            decision = await service.check(user, command_type, count)
        self.respond(decision)

    def respond(self, decision: Decision) -> None:
        # The service's clock, so resets are exact under a test clock.
        refused = decision.violation["period"] if decision.violation else None
        if decision.reason == "system_overloaded":
            refused = None
        for name, value in rate_limit_headers(decision.periods, decision.at, refused):
            self.set_header(name, value)
        if decision.reason == "system_overloaded":
            self.access_log_level = logging.INFO  # shedding load is routine, not an error
            self.set_header("Retry-After", "5")
        self.send_json(decision.to_json(), status=decision.status)

    def replay(self, answer: Replay) -> None:
        """The stored answer again, byte for byte, with headers for the time of the retry."""
        body = answer.body
        calendar = self.app.quota.calendar
        periods = {}
        for period, fields in body.get("periods", {}).items():
            ends = datetime.fromisoformat(fields["resets_at"])
            window = calendar.window(period, ends - timedelta(microseconds=1))
            periods[period] = PeriodStatus(
                fields["limit"], fields["used"], ends, None, window.seconds
            )
        refused = body["violation"]["period"] if answer.status == 429 else None
        for name, value in rate_limit_headers(periods, answer.at, refused):
            self.set_header(name, value)
        self.set_header("Idempotent-Replayed", "true")
        self.set_status(answer.status)
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(answer.response)


class CheckHandler(QuotaRequestHandler):
    """POST /api/quotas/check: would this be admitted? No side effects."""


class ConsumeHandler(QuotaRequestHandler):
    """POST /api/quotas/consume: admit and count, or deny and record a violation."""

    consume = True


class BatchConsumeHandler(BaseHandler):
    """POST /api/quotas/consume/batch: up to 500 consumes decided in one transaction.

    ``{"decisions": [{"user", "command_type", "count"?, "key"?}, ...]}`` answers 200 with
    ``{"results": [...]}`` in the same order: each result is the single consume's answer
    with its ``status`` (200, 429, 503), ``replayed: true`` for an item whose ``key`` was
    seen before, or ``{"status": 422, "error": ...}`` for a key reused with another item.
    A bad item refuses the whole batch (400, naming it) before anything is counted.
    """

    roles = SERVICE

    async def post(self) -> None:
        body = self.json_body(BATCH_FIELDS, required=("decisions",))
        decisions = body["decisions"]
        if not isinstance(decisions, list) or not decisions:
            raise ApiError(400, "invalid_field", "decisions must be a non-empty list")
        if len(decisions) > MAX_BATCH:
            raise ApiError(400, "invalid_field", f"decisions holds at most {MAX_BATCH} items")
        items = [self._item(i, d) for i, d in enumerate(decisions)]
        results = await self.app.quota.consume_batch(items)
        self.send_json({"results": [_batch_result(r) for r in results]})

    def _item(self, index: int, raw: Any) -> BatchItem:
        try:
            if not isinstance(raw, dict):
                raise ApiError(400, "invalid_field", "each decision must be a JSON object")
            body = json_item(raw, self.controls_checked)
            config = self.app.config
            user = validate_username(body["user"], config["quotas.max_username_length"])
            command_type = validate_command_type(body["command_type"])
            self.app.quota.validate_command_type(command_type)
            count = validate_count(body.get("count", 1), config["quotas.max_count"])
            key = None
            if "key" in body:
                if not isinstance(body["key"], str):
                    raise ApiError(400, "invalid_field", "key must be a string")
                key = RequestKey.of(
                    self.identity.token_id,
                    parse_key(body["key"]),
                    "consume",
                    user,
                    command_type,
                    count,
                )
        except DomainError as exc:  # the item's refusal, named, refuses the batch
            raise ApiError(exc.status, exc.code, f"decisions[{index}]: {exc.message}") from None
        return BatchItem(user, command_type, count, key)


def json_item(raw: Any, controls_checked: bool = False) -> dict[str, Any]:
    """A batch item: an object with the single consume's fields and ``key``."""
    return json_body(raw, BATCH_ITEM_FIELDS, ("user", "command_type"), controls_checked)


def _batch_result(result: BatchResult) -> dict[str, Any]:
    if isinstance(result, Decision):
        return {"status": result.status, **result.to_json()}
    if isinstance(result, Replay):
        return {"status": result.status, "replayed": True, **result.body}
    return {"status": result.status, "error": {"code": result.code, "message": result.message}}


class RefundHandler(BaseHandler):
    """POST /api/quotas/refund: give back the count of the consume made with ``key``."""

    roles = SERVICE

    async def post(self) -> None:
        body = self.json_body(REFUND_FIELDS, required=tuple(REFUND_FIELDS))
        config = self.app.config
        user = validate_username(body["user"], config["quotas.max_username_length"])
        command_type = validate_command_type(body["command_type"])
        if not isinstance(body["key"], str):
            raise ApiError(400, "invalid_field", "key must be a string")
        key = parse_key(body["key"])
        refund = await self.app.refunds.refund(
            self.identity.token_id, user, command_type, key, self.actor
        )
        if refund.replayed:
            self.set_header("Idempotent-Replayed", "true")
        self.set_header("Content-Type", "application/json; charset=utf-8")
        self.finish(refund.response)


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
