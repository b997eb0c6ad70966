"""The admin REST API under ``/api/admin/quotas/``: thin handlers over the services.

Reads admit viewers; writes need an admin (and, for a browser session, the XSRF header).
Queries live in :mod:`quotaserver.admin_queries` and :mod:`quotaserver.history`; changes go
through ``app.rules`` and ``app.alerts``, which audit, persist and publish them.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from .. import csv_export
from ..admin_queries import USER_SORTS, AdminQueries, PageRequest
from ..alerts import SEVERITIES, STATUSES
from ..cursors import BadCursor
from ..text import normalize_name
from ..windows import isoformat
from .base import ADMIN, VIEWER, ApiError, BaseHandler
from .params import (
    MAX_PER_PAGE,
    choice_arg,
    int_arg,
    page_arg,
    refuse_hidden,
    str_arg,
    time_arg,
    validate_username,
)
from .streams import parse_types

if TYPE_CHECKING:
    from ..app import QuotaApp

ALERT_STATUS_FILTERS = (*STATUSES, "active", "all")


class AdminHandler(BaseHandler):
    """Base of the admin routes: viewers read, admins write (service errors are domain
    errors, rendered by BaseHandler.write_error)."""

    roles = ADMIN
    method_roles = {"GET": VIEWER, "HEAD": VIEWER}

    def initialize(self, app: QuotaApp) -> None:
        super().initialize(app)
        self.queries = AdminQueries(app)

    def username_arg(self, raw: str) -> str:
        return validate_username(raw, self.app.config["quotas.max_username_length"], "username")

    def name_filter(self, name: str) -> str | None:
        """A user-name query argument in the names' one spelling (NFC), like stored names."""
        raw = str_arg(self, name, self.app.config["quotas.max_username_length"])
        return normalize_name(raw) if raw else raw

    def command_type_arg(self, raw: str) -> str:
        refuse_hidden(raw, "command_type")
        if raw not in self.app.quota.command_types:
            raise ApiError(404, "unknown_command_type", f"unknown command type {raw!r}")
        return raw

    def limits_body(self, allowed: set[str] | None = None) -> dict[str, Any]:
        return self.json_body(allowed or {"limits"}, required=("limits",))

    def period_args(self) -> list[str] | None:
        periods = self.get_query_arguments("period")
        if not periods:
            return None
        bad = [p for p in periods if p not in self.app.quota.periods]
        if bad:
            raise ApiError(400, "invalid_parameter", f"unknown or untracked period {bad[0]!r}")
        return periods

    def cursor_arg(self) -> str | None:
        """The ``cursor`` of a keyset page (its content is checked by the query)."""
        return str_arg(self, "cursor", 1024)

    async def send_csv(self, name: str, header: list[str], pages: Any, row: Any) -> None:
        """Stream a CSV download: the header, then each page's rows as it is read. An error
        before the first page is the usual JSON envelope; after it, the download is cut."""
        first = True
        try:
            async for page in pages:
                if first:
                    self.set_header("Content-Type", "text/csv; charset=utf-8")
                    self.set_header("Content-Disposition", f'attachment; filename="{name}"')
                    self.write(csv_export.encode([header]))
                    first = False
                self.write(csv_export.encode([row(item) for item in page["items"]]))
                await self.flush()
        except BadCursor:
            raise ApiError(400, "invalid_parameter", "cursor is not valid") from None
        self.finish()

    async def listing(self, call: Awaitable[dict[str, Any]]) -> None:
        """Send one page of a list; a cursor this server did not issue is a 400."""
        try:
            self.send_json(await call)
        except BadCursor:
            raise ApiError(400, "invalid_parameter", "cursor is not valid") from None


# -- overview -------------------------------------------------------------------------
class StatsHandler(AdminHandler):
    """GET /api/admin/quotas/stats: the current stats snapshot (what ``stats`` streams)."""

    def get(self) -> None:
        self.send_json(
            {
                "stats": self.app.stats_snapshot(),
                "seq": self.app.hub.last_seq,
                "server_time": isoformat(self.app.clock()),
            }
        )


class HistoryHandler(AdminHandler):
    """GET /api/admin/quotas/history?minutes=&bucket=&load_minutes=: activity per bucket
    (a minute by default) and recent load, for the charts."""

    async def get(self) -> None:
        minutes = int_arg(self, "minutes", 60, 1, 30 * 24 * 60)
        bucket = int(choice_arg(self, "bucket", ("60", "600", "3600", "86400"), "60"))
        points = minutes * 60 // bucket
        if minutes * 60 % bucket or not 1 <= points <= 24 * 60:
            raise ApiError(
                400, "invalid_parameter", "minutes must be a whole number of buckets, 1 to 1440"
            )
        load_minutes = int_arg(self, "load_minutes", 15, 1, 15)
        now = self.app.clock()
        await self.app.quota.flush_activity()  # this process's buffered minutes, if any
        activity = await self.queries.activity(now, minutes, bucket)
        self.send_json(
            {
                "server_time": isoformat(now),
                "minutes": minutes,
                "bucket": bucket,
                "activity": activity,
                "load_minutes": load_minutes,
                "load": await self.app.load_log.since(load_minutes * 60.0),
            }
        )


class ViolationsDailyHandler(AdminHandler):
    """GET /api/admin/quotas/violations/daily: violations per day, last 30 days."""

    async def get(self) -> None:
        days = int_arg(self, "days", 30, 1, 366)
        points = await self.queries.violations_per_day(days)
        self.send_json(
            {
                "days": points,
                "total": sum(p["violations"] for p in points),
                "timezone": self.app.config["quotas.timezone"],
            }
        )


class EventsHandler(AdminHandler):
    """GET /api/admin/quotas/events: recent durable events with their seq (the feeds)."""

    async def get(self) -> None:
        types = parse_types(self.get_query_argument("types", None), self.app.stream_types())
        limit = int_arg(self, "limit", 50, 1, 500)
        before = int_arg(self, "before", None, 1, 2**62)
        await self.listing(self.queries.events(types, limit, before, self.cursor_arg()))


# -- users ----------------------------------------------------------------------------
class UsersHandler(AdminHandler):
    """GET /api/admin/quotas/users?q=&sort=&page=&per_page="""

    async def get(self) -> None:
        search = self.name_filter("q") or ""
        sort = choice_arg(self, "sort", USER_SORTS, "username")
        page = page_arg(self, per_page=25)
        try:
            result = await self.queries.users(search, sort, page, self.cursor_arg())
        except BadCursor:
            raise ApiError(400, "invalid_parameter", "cursor is not valid") from None
        result["command_types"] = list(self.app.quota.command_types)
        self.send_json(result)


class UsersCsvHandler(AdminHandler):
    """GET /api/admin/quotas/users.csv?q=&sort=: every user of the list, as CSV."""

    async def get(self) -> None:
        search = str_arg(self, "q", self.app.config["quotas.max_username_length"]) or ""
        sort = choice_arg(self, "sort", USER_SORTS, "username")
        types = list(self.app.quota.command_types)

        def read(cursor: str | None, number: int) -> Awaitable[dict[str, Any]]:
            page = PageRequest(number, csv_export.PAGE)
            return self.queries.users(search, sort, page, cursor)

        await self.send_csv(
            "users.csv",
            csv_export.user_header(types),
            csv_export.pages(read),
            lambda item: csv_export.user_row(item, types),
        )


class UserHandler(AdminHandler):
    """GET /api/admin/quotas/users/{username}"""

    async def get(self, username: str) -> None:
        detail = await self.queries.user_detail(self.username_arg(username))
        if detail is None:
            raise ApiError(404, "unknown_user", "no such user")
        self.send_json(detail)


class UserLimitsHandler(AdminHandler):
    """PUT/DELETE /api/admin/quotas/users/{username}/limits/{command_type}: overrides."""

    async def put(self, username: str, command_type: str) -> None:
        username = self.username_arg(username)
        command_type = self.command_type_arg(command_type)
        body = self.limits_body()
        result = await self.app.rules.set_user_limits(
            username, command_type, body["limits"], self.actor
        )
        self.send_json(result)

    async def delete(self, username: str, command_type: str) -> None:
        username = self.username_arg(username)
        command_type = self.command_type_arg(command_type)
        periods = self.period_args()
        result = await self.app.rules.remove_user_override(
            username, command_type, periods, self.actor
        )
        self.send_json(result)


class UserResetHandler(AdminHandler):
    """POST /api/admin/quotas/users/{username}/reset {"command_type": optional}"""

    async def post(self, username: str) -> None:
        username = self.username_arg(username)
        body = self.json_body({"command_type"}, empty_ok=True)
        command_type = body.get("command_type")
        if command_type is not None and command_type not in self.app.quota.command_types:
            raise ApiError(400, "unknown_command_type", "command_type must be a known type or null")
        result = await self.app.rules.reset_usage(username, command_type, self.actor)
        self.send_json(result)


class OverridesHandler(AdminHandler):
    """GET /api/admin/quotas/overrides?user=&per_page=&cursor=: per-user overrides."""

    async def get(self) -> None:
        user = self.name_filter("user")
        per_page = int_arg(self, "per_page", MAX_PER_PAGE, 1, MAX_PER_PAGE)
        await self.listing(self.queries.overrides(user, per_page, self.cursor_arg()))


# -- rules ----------------------------------------------------------------------------
class RulesHandler(AdminHandler):
    """GET /api/admin/quotas/rules; POST creates or updates a global rule or an override."""

    async def get(self) -> None:
        rules = await self.app.rules.list_rules()
        rules["command_types"] = list(self.app.quota.command_types)
        rules["seq"] = self.app.hub.last_seq
        self.send_json(rules)

    async def post(self) -> None:
        body = self.limits_body({"command_type", "limits", "username"})
        command_type = body.get("command_type")
        if not isinstance(command_type, str) or not command_type:
            raise ApiError(400, "missing_field", "command_type is required")
        if command_type not in self.app.quota.command_types:
            raise ApiError(400, "unknown_command_type", f"unknown command type {command_type!r}")
        rules = self.app.rules
        if body.get("username") is None:
            change = rules.set_global_limits(command_type, body["limits"], self.actor)
        else:
            username = self.username_arg(body["username"])
            change = rules.set_user_limits(username, command_type, body["limits"], self.actor)
        self.send_json(await change, status=201)


class RuleHandler(AdminHandler):
    """PUT/DELETE /api/admin/quotas/rules/{command_type}: the global default of one type.

    DELETE makes periods unlimited (``?period=`` some, else all). The rows stay, as
    ``null`` limits, so the configured defaults are not seeded back at the next start.
    """

    async def put(self, command_type: str) -> None:
        command_type = self.command_type_arg(command_type)
        body = self.limits_body()
        result = await self.app.rules.set_global_limits(command_type, body["limits"], self.actor)
        self.send_json(result)

    async def delete(self, command_type: str) -> None:
        command_type = self.command_type_arg(command_type)
        periods = self.period_args() or list(self.app.quota.periods)
        result = await self.app.rules.set_global_limits(
            command_type, dict.fromkeys(periods), self.actor
        )
        self.send_json(result)


# -- violations, alerts, audit --------------------------------------------------------
class ViolationsHandler(AdminHandler):
    """GET /api/admin/quotas/violations?user=&command_type=&since=&page=&per_page=&cursor="""

    async def get(self) -> None:
        user = self.name_filter("user")
        command_type = choice_arg(self, "command_type", self.app.quota.command_types)
        since = time_arg(self, "since")
        page = page_arg(self)
        cursor = self.cursor_arg()
        await self.listing(self.queries.violations(page, user, command_type, since, cursor))


class ViolationsCsvHandler(AdminHandler):
    """GET /api/admin/quotas/violations.csv?user=&command_type=&since=: as CSV, newest first."""

    async def get(self) -> None:
        user = str_arg(self, "user", self.app.config["quotas.max_username_length"])
        command_type = choice_arg(self, "command_type", self.app.quota.command_types)
        since = time_arg(self, "since")

        def read(cursor: str | None, number: int) -> Awaitable[dict[str, Any]]:
            page = PageRequest(number, csv_export.PAGE)
            return self.queries.violations(page, user, command_type, since, cursor)

        await self.send_csv(
            "violations.csv",
            csv_export.VIOLATION_HEADER,
            csv_export.pages(read),
            csv_export.violation_row,
        )


class AlertsHandler(AdminHandler):
    """GET /api/admin/quotas/alerts?status=&severity=&user=&page=&per_page=&cursor="""

    async def get(self) -> None:
        status = choice_arg(self, "status", ALERT_STATUS_FILTERS, "all")
        statuses = {
            "all": None,
            "active": ["open", "acknowledged"],
        }.get(status, [status])
        severity = choice_arg(self, "severity", SEVERITIES)
        user = str_arg(self, "user", self.app.config["quotas.max_username_length"])
        page = page_arg(self)
        await self.listing(self.queries.alerts(page, statuses, severity, self.cursor_arg(), user))


class AlertActionHandler(AdminHandler):
    """POST /api/admin/quotas/alerts/{id}/acknowledge and /resolve"""

    async def post(self, alert_id: str, action: str) -> None:
        # isascii: "²".isdigit() is true but int("²") raises.
        ok = alert_id.isascii() and alert_id.isdigit() and len(alert_id) <= 18
        ident = int(alert_id) if ok else 0
        if ident <= 0:  # also keeps huge numbers away from the database's integer range
            raise ApiError(404, "unknown_alert", "no such alert")
        service = self.app.alerts
        change = service.acknowledge if action == "acknowledge" else service.resolve
        self.send_json(await change(ident, self.actor))


class AuditHandler(AdminHandler):
    """GET /api/admin/quotas/audit?action=&actor=&user=&page=&per_page=&cursor="""

    async def get(self) -> None:
        action = str_arg(self, "action", 64)
        actor = str_arg(self, "actor", 128)
        user = str_arg(self, "user", self.app.config["quotas.max_username_length"])
        page = page_arg(self)
        await self.listing(self.queries.audit(page, action, actor, self.cursor_arg(), user))
