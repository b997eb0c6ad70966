"""Health of the real-time core and the plugin list."""

from __future__ import annotations

from .. import __version__
from ..plugins import plugin_list
from .base import VIEWER, BaseHandler


class StreamHealthHandler(BaseHandler):
    """GET /api/ws/health: clients per transport, limits, seq, sources."""

    roles = VIEWER

    def get(self) -> None:
        app = self.app
        hub = app.hub
        sources = [h.to_json() for h in app.scheduler.sources.values()]
        plugins_health = app.hooks.json_results("health_fields", app=app)
        # A plugin whose latest hook call failed or timed out degrades the stream too.
        healthy = (
            app.running
            and all(s["healthy"] for s in sources)
            and all(fields.get("healthy", True) is not False for fields in plugins_health.values())
            and not app.hooks.failing
            and not app.hooks.disabled
            and app.backplane.connected
            and app.store.available
        )
        self.send_json(
            {
                "status": "ok" if healthy else "degraded",
                "version": __version__,
                "broadcaster_running": app.running,
                "instance": app.instance_name,
                "backplane": app.backplane.health(),
                "database": app.store.health(),
                "clients": {
                    "websocket": hub.count("websocket"),
                    "sse": hub.count("sse"),
                    "total": hub.count(),
                },
                "max_connections": hub.max_connections,
                "seq": hub.last_seq,
                "backfilled": hub.sequencer.backfilled,
                "published": hub.published,
                "slow_consumers_closed": hub.slow_closed,
                "sources": sources,
                "plugin_errors": app.hooks.errors,
                "plugin_failures": app.hooks.failures_json(),
                "loop_blocks": app.hooks.loop_blocks,
                "plugins_disabled": app.hooks.disabled,
                "plugins_health": plugins_health,
            }
        )


class PluginsHandler(BaseHandler):
    """GET /api/plugins: registered plugins: version, source, hooks, event types, failures."""

    roles = VIEWER

    def get(self) -> None:
        hooks = self.app.hooks
        plugins = [
            {**p, "failures": hooks.failures_json(p["name"])} for p in plugin_list(self.app.pm)
        ]
        self.send_json({"plugins": plugins, "event_types": sorted(hooks.event_types)})
