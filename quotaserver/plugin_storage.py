"""PluginStorage: a plugin's small state that outlives a restart (``app.plugin_storage``).

``app.plugin_state(name)`` is a dict for the life of one application; what must survive a
restart (a cursor into the event log, a last-seen value) is saved here, one JSON value per
(plugin, key), through the store's worker threads like every other write.
"""

from __future__ import annotations

import json
from typing import Any

from .db import Store
from .models import PluginData, naive_utc
from .windows import Clock, utc_now


class PluginStorage:
    """``await load(plugin)`` every saved value of a plugin; ``await save(plugin, key, value)``."""

    def __init__(self, store: Store, clock: Clock = utc_now):
        self.store = store
        self.clock = clock

    async def load(self, plugin: str) -> dict[str, Any]:
        """Every key ``plugin`` saved, with its value as saved (JSON types)."""

        def read() -> dict[str, Any]:
            rows = PluginData.select().where(PluginData.plugin == plugin)
            return {row.key: json.loads(row.value) for row in rows}

        return await self.store.read(read)

    async def save(self, plugin: str, key: str, value: Any) -> None:
        """Store ``value`` (JSON-serialisable) under ``key``, replacing what was there."""
        text = json.dumps(value)  # before the thread: a bad value fails here, in the caller
        stamp = naive_utc(self.clock())

        def write() -> None:
            PluginData.insert(plugin=plugin, key=key, value=text, updated_at=stamp).on_conflict(
                conflict_target=[PluginData.plugin, PluginData.key],
                update={PluginData.value: text, PluginData.updated_at: stamp},
            ).execute()

        await self.store.run(write)
