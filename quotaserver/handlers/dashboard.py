"""The admin dashboard page (``GET /admin/quotas``) and the ``/`` redirect to it.

The page is a static shell; its script loads data over the admin API and the live stream.
A browser without a session is sent to the login form and brought back afterwards.
"""

from __future__ import annotations

from .base import VIEWER, BaseHandler

DASHBOARD = "/admin/quotas"


class DashboardHandler(BaseHandler):
    """GET /admin/quotas: the live admin dashboard (viewers see it read-only)."""

    roles = VIEWER
    page = True  # a browser without a session goes to the login form, then comes back

    def get(self) -> None:
        identity = self.identity
        self.render(
            "admin_quotas_dashboard.html",
            # Sets the _xsrf cookie (the session's token) the page echoes in X-XSRFToken.
            xsrf=self.session_xsrf_token(),
            actor=identity.name if identity else "anonymous",
            role=identity.role if identity else "admin",
            session=bool(identity and identity.session_id),
            # The event types plugins declared: the page's plugin events feed loads them.
            plugin_types=self.app.hub.plugin_types,
        )


class RootHandler(BaseHandler):
    """GET /: the dashboard is the home page."""

    roles = None

    def get(self) -> None:
        self.redirect(DASHBOARD)
