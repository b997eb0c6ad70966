"""Every route in one list. Each handler class declares the roles it admits."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .handlers import (
    admin,
    api,
    dashboard,
    dev,
    health,
    metrics,
    openapi,
    session,
    sse,
    tokens,
    websocket,
)
from .handlers.base import MisdirectedHandler, NotFoundHandler, StaticHandler

if TYPE_CHECKING:
    from .app import QuotaApp

ROUTES: list[tuple[str, type]] = [
    (r"/api/health", api.HealthHandler),
    (r"/api/health/live", api.LiveHandler),
    (r"/api/health/ready", api.ReadyHandler),
    (r"/api/openapi.json", openapi.OpenApiHandler),
    (r"/api/quotas/check", api.CheckHandler),
    (r"/api/quotas/consume", api.ConsumeHandler),
    (r"/api/quotas/consume/batch", api.BatchConsumeHandler),
    (r"/api/quotas/refund", api.RefundHandler),
    (r"/api/quotas/users/([^/]+)", api.UserStatusHandler),
    (r"/api/ws/health", health.StreamHealthHandler),
    (r"/api/plugins", health.PluginsHandler),
    (r"/metrics", metrics.MetricsHandler),
    (r"/ws/admin/quotas", websocket.AdminSocketHandler),
    (r"/sse/admin/quotas", sse.AdminEventsHandler),
    (r"/login", session.LoginHandler),
    (r"/logout", session.LogoutHandler),
    (r"/api/admin/tokens", tokens.TokensHandler),
    (r"/api/admin/tokens/([0-9a-f]{16})", tokens.TokenHandler),
    (r"/", dashboard.RootHandler),
    (r"/admin/quotas", dashboard.DashboardHandler),
    (r"/admin/quotas/users/([^/]+)", dashboard.UserPageHandler),
    (r"/api/admin/quotas/stats", admin.StatsHandler),
    (r"/api/admin/quotas/history", admin.HistoryHandler),
    (r"/api/admin/quotas/events", admin.EventsHandler),
    (r"/api/admin/quotas/users", admin.UsersHandler),
    (r"/api/admin/quotas/users\.csv", admin.UsersCsvHandler),
    (r"/api/admin/quotas/users/([^/]+)", admin.UserHandler),
    (r"/api/admin/quotas/users/([^/]+)/limits/([^/]+)", admin.UserLimitsHandler),
    (r"/api/admin/quotas/users/([^/]+)/reset", admin.UserResetHandler),
    (r"/api/admin/quotas/overrides", admin.OverridesHandler),
    (r"/api/admin/quotas/rules", admin.RulesHandler),
    (r"/api/admin/quotas/rules/([^/]+)", admin.RuleHandler),
    (r"/api/admin/quotas/violations", admin.ViolationsHandler),
    (r"/api/admin/quotas/violations/daily", admin.ViolationsDailyHandler),
    (r"/api/admin/quotas/violations\.csv", admin.ViolationsCsvHandler),
    (r"/api/admin/quotas/alerts", admin.AlertsHandler),
    (r"/api/admin/quotas/alerts/([^/]+)/(acknowledge|resolve)", admin.AlertActionHandler),
    (r"/api/admin/quotas/audit", admin.AuditHandler),
]

DEV_ROUTES: list[tuple[str, type]] = [
    (r"/api/ws/test-broadcast", dev.TestBroadcastHandler),
    (r"/api/ws/test-violation", dev.TestViolationHandler),
    (r"/api/ws/test-alert", dev.TestAlertHandler),
]


def routes(app: QuotaApp) -> list[tuple[str, type, dict[str, Any]]]:
    table = ROUTES + (DEV_ROUTES if app.config["dev"] else [])
    return [(pattern, handler, {"app": app}) for pattern, handler in table] + [
        (r".*", NotFoundHandler, {"app": app})
    ]


def route_templates(app: QuotaApp) -> dict[type, str]:
    """Handler class -> its route as a metrics label (``/api/admin/quotas/users/*``): a
    bounded set, never the path itself (user names would make a series per user)."""
    names = {handler: re.sub(r"\([^)]*\)", "*", pattern) for pattern, handler, _ in routes(app)}
    names[NotFoundHandler] = "unmatched"
    names[MisdirectedHandler] = "misdirected"
    names[StaticHandler] = "/static/*"
    return names
