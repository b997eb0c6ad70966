"""quotaserver: per-user command quotas with a live admin dashboard."""

import pluggy

__version__ = "0.1.0"

#: Marker for plugin hook implementations: ``@hookimpl def stats_fields(app): ...``
hookimpl = pluggy.HookimplMarker("quotaserver")
