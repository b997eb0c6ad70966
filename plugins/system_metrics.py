"""System metrics: CPU and memory via psutil, sampled off the IOLoop.

Feeds the throttle factor (``app.load``, which the ``system_load`` stats field of
quota analytics reads). When a new factor has held (see quotaserver/throttle.py) it logs
one line and publishes one durable ``throttle`` event. ``throttle.source`` chooses what is
sampled: the host, this process, or (``off``) the host for display only.

Settings (``plugins.system_metrics``): ``interval`` seconds between samples (default 2).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import psutil

from quotaserver import PeriodicEmitter, check_plugin_block, hookimpl, positive_number

NAME = "system_metrics"
log = logging.getLogger("quotaserver.throttle")
_PROCESS = psutil.Process()


def sample(source: str = "host") -> tuple[float, float]:
    """CPU % since the previous call and memory % in use (blocking: call off the loop).

    ``process``: this server's CPU as a share of one core (the IOLoop runs on one, so 100
    means saturated), capped at 100, and its resident memory as a share of the machine's.
    """
    if source == "process":
        return min(_PROCESS.cpu_percent(interval=None), 100.0), _PROCESS.memory_percent()
    return psutil.cpu_percent(interval=None), psutil.virtual_memory().percent


@hookimpl
def validate_config(config: Any) -> list[str]:
    return check_plugin_block(NAME, config.plugin(NAME), {"interval": positive_number})


@hookimpl
def register_emitters(app: Any) -> list[PeriodicEmitter]:
    interval = float(app.plugin_config(NAME).get("interval", 2.0))
    loop = asyncio.get_running_loop()

    async def collect() -> None:
        cpu, memory = await loop.run_in_executor(None, sample, app.load.source)
        previous = app.load.factor
        current, changed = app.load.update(cpu, memory)
        if changed:
            log.log(
                logging.WARNING if current.factor < previous else logging.INFO,
                "throttle factor %s -> %s (%s cpu %.1f%%, memory %.1f%%)",
                previous,
                current.factor,
                app.load.source,
                current.cpu_percent,
                current.memory_percent,
            )
            await app.publish_event(
                "throttle",
                {
                    "throttle_factor": current.factor,
                    "previous_factor": previous,
                    "cpu_percent": current.cpu_percent,
                    "memory_percent": current.memory_percent,
                    "throttle_active": current.throttle_active,
                },
            )

    return [PeriodicEmitter("system_metrics", interval, collect, timeout=max(interval, 5.0))]
