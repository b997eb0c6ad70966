"""Load history: keeps the recent CPU/memory samples for the dashboard's load chart.

The system-metrics plugin measures; this one only copies each new measurement of
``app.load`` into the in-memory ring that ``GET /api/admin/quotas/history`` reads. Nothing
is recorded while nothing measures (for example with system_metrics disabled).

Settings (``plugins.load_history``): ``interval`` seconds between looks (default 2).
"""

from __future__ import annotations

from typing import Any

from quotaserver import hookimpl
from quotaserver.config import check_plugin_block, positive_number
from quotaserver.history import LOAD_PLUGIN, load_ring
from quotaserver.realtime.emitters import PeriodicEmitter

NAME = LOAD_PLUGIN


@hookimpl
def validate_config(config: Any) -> list[str]:
    return check_plugin_block(NAME, config.plugin(NAME), {"interval": positive_number})


@hookimpl
def register_emitters(app: Any) -> list[PeriodicEmitter]:
    interval = float(app.plugin_config(NAME).get("interval", 2.0))
    ring = load_ring(app)

    def collect() -> None:
        # In-memory only: cheap enough for the IOLoop.
        ring.record(app.load.current)

    return [PeriodicEmitter(NAME, interval, collect)]
