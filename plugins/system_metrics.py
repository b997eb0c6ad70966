"""System metrics: CPU and memory via psutil, sampled off the IOLoop.

Feeds the throttle factor (``app.load``, which the ``system_load`` stats field of
quota analytics reads) and publishes a durable ``throttle`` event whenever the factor
changes band.

Settings (``plugins.system_metrics``): ``interval`` seconds between samples (default 2).
"""

from __future__ import annotations

import asyncio
from typing import Any

import psutil

from quotaserver import hookimpl
from quotaserver.config import check_plugin_block, positive_number
from quotaserver.realtime.emitters import PeriodicEmitter

NAME = "system_metrics"


def sample() -> tuple[float, float]:
    """CPU % since the previous call and memory % in use (blocking: call off the loop)."""
    return psutil.cpu_percent(interval=None), psutil.virtual_memory().percent


@hookimpl
def validate_config(config: Any) -> list[str]:
    return check_plugin_block(NAME, config.plugin(NAME), {"interval": positive_number})


@hookimpl
def register_emitters(app: Any) -> list[PeriodicEmitter]:
    interval = float(app.plugin_config(NAME).get("interval", 2.0))
    loop = asyncio.get_running_loop()

    async def collect() -> None:
        cpu, memory = await loop.run_in_executor(None, sample)
        previous = app.load.factor
        current, changed = app.load.update(cpu, memory)
        if changed:
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
