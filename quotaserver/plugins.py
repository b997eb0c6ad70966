"""Plugin loading (built-ins, entry points, a plugins directory) and isolated hook calls."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .config import Config, ConfigError
from .realtime.emitters import maybe_await

log = logging.getLogger(__name__)

PROJECT = "quotaserver"
ENTRY_POINT_GROUP = "quotaserver"
BUILTIN_PLUGINS = (
    "plugins.system_metrics",
    "plugins.quota_analytics",
    "plugins.alert_engine",
    "plugins.load_history",
)


def _import_file(path: str) -> ModuleType:
    name = "quotaserver_plugin_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def get_plugin_manager(config: Config | None = None) -> pluggy.PluginManager:
    """A fresh manager with the built-in, installed and directory plugins that are enabled.

    Plugin names: a built-in's module name (``system_metrics``), an entry point's name, or a
    directory file's stem. ``plugins: {<name>: {enabled: false}}`` skips any of them.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    known: set[str] = set()

    def enabled(name: str) -> bool:
        known.add(name)
        return config is None or config.plugin_enabled(name)

    for dotted in BUILTIN_PLUGINS:
        name = dotted.rsplit(".", 1)[-1]
        if enabled(name):
            pm.register(importlib.import_module(dotted), name=name)

    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if not enabled(ep.name) or pm.has_plugin(ep.name):
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as exc:  # a broken third-party plugin must not stop the server
            log.error("plugin %s (entry point) failed to load: %s", ep.name, exc)

    directory = config["plugins_dir"] if config is not None else ""
    if directory:
        if not os.path.isdir(directory):
            raise ConfigError(f"plugins_dir: not a directory: {directory}")
        for filename in sorted(os.listdir(directory)):
            if not filename.endswith(".py") or filename.startswith("_"):
                continue
            name = filename[:-3]
            if not enabled(name) or pm.has_plugin(name):
                continue
            try:
                pm.register(_import_file(os.path.join(directory, filename)), name=name)
            except Exception as exc:
                log.error("plugin %s (%s) failed to load: %s", name, filename, exc)

    pm.check_pending()
    if config is not None:
        source = f" (in {config.source})" if config.source else ""
        for name in config.plugins:
            if name not in known:
                raise ConfigError(f"plugins.{name}: no such plugin{source}")
        for impl in reversed(pm.hook.validate_config.get_hookimpls()):
            try:
                errors = impl.function(config=config) or []
            except Exception as exc:  # a validator that breaks is a configuration problem too
                errors = [f"plugins.{impl.plugin_name}: {type(exc).__name__}: {exc}"]
            if errors:
                raise ConfigError(f"{errors[0]}{source}")
    return pm


def plugin_list(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """Name, version and implemented hooks of every registered plugin."""
    out = [
        {
            "name": pm.get_name(plugin),
            "version": getattr(plugin, "__version__", None),
            "hooks": sorted(h.name for h in pm.get_hookcallers(plugin) or []),
        }
        for plugin in pm.get_plugins()
    ]
    return sorted(out, key=lambda p: p["name"])


class Hooks:
    """Calls hooks one implementation at a time, so one failing plugin cannot stop the rest.

    (pluggy stops a hook call at the first exception.)
    """

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self.errors: dict[str, str] = {}

    def call(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call every implementation of ``hook``; return ``(plugin name, result)`` pairs."""
        results = []
        for impl in reversed(getattr(self.pm.hook, hook).get_hookimpls()):
            try:
                result = impl.function(**{k: kwargs[k] for k in impl.argnames})
            except Exception as exc:
                self._failed(impl.plugin_name, hook, exc)
                continue
            if result is not None:
                results.append((impl.plugin_name, result))
        return results

    async def call_async(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Like :meth:`call`, awaiting results that are awaitable."""
        results = []
        for name, result in self.call(hook, **kwargs):
            try:
                results.append((name, await maybe_await(result)))
            except Exception as exc:
                self._failed(name, hook, exc)
        return results

    def _failed(self, plugin: str, hook: str, exc: Exception) -> None:
        self.errors[plugin] = f"{hook}: {type(exc).__name__}: {exc}"[:500]
        log.error("plugin %s failed in %s: %s", plugin, hook, exc, exc_info=exc)
