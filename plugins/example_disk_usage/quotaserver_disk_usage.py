"""Example third-party plugin: disk usage of a path, published as the stats field ``disk``.

Settings (``plugins.disk_usage``): ``path`` (default "/"), ``interval`` seconds (default 30).
It uses only the public API: the ``hookimpl`` marker, ``PeriodicEmitter``,
``config.plugin`` and ``app.plugin_config``.
"""

from __future__ import annotations

from typing import Any

import psutil

from quotaserver import PeriodicEmitter, hookimpl

__version__ = "0.1.0"


@hookimpl
def validate_config(config: Any) -> list[str]:
    """Settings errors stop start-up with exit status 2, naming the key."""
    settings = config.plugin("disk_usage")
    errors = []
    if not isinstance(settings.get("path", "/"), str):
        errors.append("plugins.disk_usage.path: must be a string")
    interval = settings.get("interval", 30.0)
    if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
        errors.append("plugins.disk_usage.interval: must be a positive number")
    return errors


@hookimpl
def register_emitters(app: Any) -> list[PeriodicEmitter]:
    settings = app.plugin_config("disk_usage")
    path = settings.get("path", "/")
    interval = float(settings.get("interval", 30.0))

    def collect() -> dict[str, Any]:
        usage = psutil.disk_usage(path)  # a filesystem call: runs on its own thread
        return {"path": path, "percent": usage.percent, "free_bytes": usage.free}

    return [PeriodicEmitter("disk_usage", interval, collect, blocking=True, stats_field="disk")]
