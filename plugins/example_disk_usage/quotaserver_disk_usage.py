"""Example third-party plugin: disk usage of a path, published as the stats field ``disk``.

Settings (``plugins.disk_usage``): ``path`` (default "/"), ``interval`` seconds (default 30).
It uses only the public API: the ``hookimpl`` marker, ``PeriodicEmitter`` and
``app.plugin_config``.
"""

from __future__ import annotations

from typing import Any

import pluggy
import psutil

from quotaserver.realtime.emitters import PeriodicEmitter

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("quotaserver")


@hookimpl
def register_emitters(app: Any) -> list[PeriodicEmitter]:
    settings = app.plugin_config("disk_usage")
    path = settings.get("path", "/")
    interval = float(settings.get("interval", 30.0))

    def collect() -> dict[str, Any]:
        usage = psutil.disk_usage(path)  # a filesystem call: runs on its own thread
        return {"path": path, "percent": usage.percent, "free_bytes": usage.free}

    return [PeriodicEmitter("disk_usage", interval, collect, blocking=True, stats_field="disk")]
