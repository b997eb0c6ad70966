"""The admin dashboard page (``GET /admin/quotas``, and ``/admin/quotas/users/{name}`` on
one user's view) and the ``/`` redirect to it.

The page is a static shell; its script loads data over the admin API and the live stream.
A browser without a session is sent to the login form and brought back afterwards.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os

from ..realtime.messages import SERVER_TYPES
from .base import CSP, VIEWER, BaseHandler
from .params import validate_username

DASHBOARD = "/admin/quotas"


@functools.cache
def page_modules(static_path: str) -> tuple[str, ...]:
    """The page's ES modules (static/js/admin/<name>.js), preloaded and version-mapped: read
    from the directory once, so a new module cannot be left out of the map."""
    folder = os.path.join(static_path, "js", "admin")
    return tuple(sorted(n[:-3] for n in os.listdir(folder) if n.endswith(".js")))


class DashboardHandler(BaseHandler):
    """GET /admin/quotas: the live admin dashboard (viewers see it read-only)."""

    roles = VIEWER
    page = True  # a browser without a session goes to the login form, then comes back

    def get(self) -> None:
        self.render_page(None)

    def import_map(self) -> str:
        """Every module URL mapped to its versioned one (``?v=`` the file's hash).

        Modules import each other by plain relative paths (``./api.js``); the import map makes
        the browser fetch the versioned URL instead, which the static handler serves with a
        ten-year cache lifetime: a release changes the hashes, so no stale module is run.
        """
        modules = page_modules(self.settings["static_path"])
        urls = {f"/static/js/admin/{m}.js": self.static_url(f"js/admin/{m}.js") for m in modules}
        return json.dumps({"imports": urls}, separators=(",", ":"), sort_keys=True)

    def render_page(self, page_user: str | None) -> None:
        """The one page shell; ``page_user`` opens it on that user's view."""
        identity = self.identity
        import_map = self.import_map()
        # An import map must be inline; the CSP admits exactly this one by its hash.
        digest = base64.b64encode(hashlib.sha256(import_map.encode()).digest()).decode()
        csp = CSP.replace("script-src 'self'", f"script-src 'self' 'sha256-{digest}'", 1)
        self.set_header("Content-Security-Policy", csp)
        self.render(
            "admin_quotas_dashboard.html",
            # Sets the _xsrf cookie (the session's token) the page echoes in X-XSRFToken.
            xsrf=self.session_xsrf_token(),
            actor=identity.name if identity else "anonymous",
            role=identity.role if identity else "admin",
            session=bool(identity and identity.session_id),
            # The event types plugins declared: the page's plugin events feed loads them.
            plugin_types=self.app.hub.plugin_types,
            # What the server sends of its own (an EventSource hears named events only).
            server_types=sorted(SERVER_TYPES),
            page_user=page_user,
            timezone=self.app.config["quotas.timezone"],
            import_map=import_map,
            modules=page_modules(self.settings["static_path"]),
        )


class UserPageHandler(DashboardHandler):
    """GET /admin/quotas/users/{username}: the dashboard opened on one user (a link, a
    bookmark, a reload all land there). An unknown name is the page's to say: it asks the API."""

    def get(self, username: str) -> None:  # type: ignore[override]
        name = validate_username(
            username, self.app.config["quotas.max_username_length"], "username"
        )
        self.render_page(name)


class RootHandler(BaseHandler):
    """GET /: the dashboard is the home page."""

    roles = None

    def get(self) -> None:
        self.redirect(DASHBOARD)
