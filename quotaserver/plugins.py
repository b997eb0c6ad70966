"""Plugin loading (built-ins, entry points, a plugins directory) and isolated hook calls.

Loading is loud and early: a plugin that fails to import, implements a hook that does not
exist or cannot be registered stops start-up (and ``check-config``) with a
:class:`PluginError` naming the plugin; the traceback goes to the debug log.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import difflib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy
import yaml

from . import __version__, hookspecs
from .config import PLUGIN_ENV_PREFIX, Config, ConfigError
from .isolation import current_plugin, plugin_context, running_hook
from .realtime.emitters import PeriodicEmitter, PluginError
from .realtime.messages import RESERVED_TYPES
from .windows import isoformat, utc_now

log = logging.getLogger(__name__)

PROJECT = "quotaserver"
ENTRY_POINT_GROUP = "quotaserver"
#: The package that plugins/ installs as (pyproject: tool.setuptools.package-dir).
BUILTIN_PACKAGE = "quotaserver.builtin_plugins"
BUILTIN_PLUGINS = tuple(
    f"{BUILTIN_PACKAGE}.{name}"
    for name in ("system_metrics", "quota_analytics", "alert_engine", "notify")
)
#: Event types only the core publishes: a plugin emitting one could forge a violation.
# Built-in plugins that became part of the core: their settings blocks say where they went.
RETIRED_PLUGINS = {
    "load_history": "the load history is part of the core now (throttle); remove this block",
}
SOURCES = ("built-in", "entry point", "file")

__all__ = ["PluginError", "PluginEventError", "get_plugin_manager", "plugin_list", "Hooks"]


class PluginEventError(ValueError):
    """A plugin emitted a reserved core event type or one it did not declare."""


@dataclass
class PluginInfo:
    """Where a registered plugin came from (``source`` is one of :data:`SOURCES`)."""

    name: str
    source: str
    origin: str  # module, entry point value or file path
    version: str | None = None
    event_types: tuple[str, ...] = ()


class PluginManager(pluggy.PluginManager):
    """A pluggy manager that also knows each plugin's source and version."""

    def __init__(self) -> None:
        super().__init__(PROJECT)
        self.info: dict[str, PluginInfo] = {}


@dataclass
class _Candidate:
    name: str
    source: str
    origin: str
    load: Callable[[], Any]
    version: str | None = None


def _import_file(path: str) -> ModuleType:
    name = "quotaserver_plugin_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _candidates(config: Config | None) -> list[_Candidate]:
    """Every plugin that could load, in registration order, without importing any."""
    found: list[_Candidate] = []
    seen: set[str] = set()

    def add(candidate: _Candidate) -> None:
        if candidate.name in seen:
            log.warning(
                "plugin %s (%s %s) ignored: the name is taken",
                candidate.name,
                candidate.source,
                candidate.origin,
            )
            return
        seen.add(candidate.name)
        found.append(candidate)

    for dotted in BUILTIN_PLUGINS:
        add(
            _Candidate(
                dotted.rsplit(".", 1)[-1],
                "built-in",
                dotted,
                lambda d=dotted: importlib.import_module(d),
                __version__,
            )
        )
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        version = ep.dist.version if ep.dist is not None else None
        add(_Candidate(ep.name, "entry point", ep.value, ep.load, version))
    directory = config["plugins_dir"] if config is not None else ""
    if directory:
        if not os.path.isdir(directory):
            raise ConfigError(f"plugins_dir: not a directory: {directory}")
        for filename in sorted(os.listdir(directory)):
            if filename.endswith(".py") and not filename.startswith("_"):
                path = os.path.join(directory, filename)
                add(_Candidate(filename[:-3], "file", path, lambda p=path: _import_file(p)))
    return found


def _env_key(name: str) -> str:
    return name.replace("-", "_").upper()


def apply_env_overrides(config: Config, names: list[str]) -> None:
    """``QUOTASERVER_PLUGINS_<NAME>_<KEY>=value`` sets ``plugins.<name>.<key>``.

    Plugin names contain underscores too, so ``<NAME>`` is the longest plugin name that
    matches (``QUOTASERVER_PLUGINS_ALERT_ENGINE_CHECK_INTERVAL`` is ``alert_engine``'s
    ``check_interval``); ``__`` after the name makes the split explicit. Values are YAML.
    """
    by_key = sorted(((_env_key(n), n) for n in names), key=lambda kn: -len(kn[0]))
    for var, raw in sorted(config.plugin_env.items()):
        rest = var[len(PLUGIN_ENV_PREFIX) :]
        plugin = key = None
        if "__" in rest:
            head, _, tail = rest.partition("__")
            plugin = next((n for k, n in by_key if k == head), None)
            key = tail
        else:
            for k, n in by_key:
                if rest.startswith(k + "_") and len(rest) > len(k) + 1:
                    plugin, key = n, rest[len(k) + 1 :]
                    break
        if plugin is None or not key:
            raise ConfigError(f"{var}: names no plugin (plugins: {', '.join(sorted(names))})")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"plugins.{plugin}.{key.lower()}: {var} is not valid YAML") from None
        block = config.plugins.setdefault(plugin, {})
        key = key.lower()
        if key == "enabled" and not isinstance(value, bool):
            raise ConfigError(f"plugins.{plugin}.enabled: expected bool in {var}, got {raw!r}")
        block[key] = value


def _load(candidate: _Candidate) -> Any:
    try:
        return candidate.load()
    except (Exception, SystemExit) as exc:
        log.debug("plugin %s failed to import", candidate.name, exc_info=exc)
        raise PluginError(
            f"plugin {candidate.name} ({candidate.source} {candidate.origin}) failed to "
            f"import: {type(exc).__name__}: {exc}"
        ) from None


def hook_names() -> list[str]:
    """The names of every hook in the contract."""
    return sorted(n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), PROJECT + "_spec"))


def _register(pm: PluginManager, candidate: _Candidate, plugin: Any) -> None:
    where = f"{candidate.source} {candidate.origin}"
    try:
        pm.register(plugin, name=candidate.name)
    except Exception as exc:  # pluggy: an implementation whose arguments the spec lacks
        log.debug("plugin %s failed to register", candidate.name, exc_info=exc)
        detail = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise PluginError(f"plugin {candidate.name} ({where}): {detail}") from None
    known = hook_names()
    for caller in pm.get_hookcallers(plugin) or []:
        if not caller.has_spec():
            close = difflib.get_close_matches(caller.name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise PluginError(
                f"plugin {candidate.name} ({where}): unknown hook {caller.name}{hint}"
            )
        for impl in caller.get_hookimpls():
            if impl.plugin is plugin and (impl.hookwrapper or impl.wrapper):
                # Each implementation is called on its own, under its own timeout and
                # failure count (Hooks), so there is no call for a wrapper to wrap.
                raise PluginError(
                    f"plugin {candidate.name} ({where}): {caller.name} is a hook wrapper; "
                    "quotaserver calls every implementation separately: use a plain hookimpl"
                )
    version = candidate.version or getattr(plugin, "__version__", None)
    pm.info[candidate.name] = PluginInfo(
        candidate.name, candidate.source, candidate.origin, version
    )


def get_plugin_manager(config: Config | None = None) -> PluginManager:
    """A fresh manager with the built-in, installed and directory plugins that are enabled.

    Plugin names: a built-in's module name (``system_metrics``), an entry point's name, or a
    directory file's stem. ``plugins: {<name>: {enabled: false}}`` skips any of them (a
    skipped plugin is not even imported). Raises :class:`PluginError` (a ConfigError) for a
    plugin that cannot load.
    """
    pm = PluginManager()
    pm.add_hookspecs(hookspecs)
    candidates = _candidates(config)
    names = [c.name for c in candidates]
    if config is not None:
        apply_env_overrides(config, names)
    for candidate in candidates:
        if config is None or config.plugin_enabled(candidate.name):
            _register(pm, candidate, _load(candidate))

    if config is not None:
        check_plugin_settings(pm, config, names)
    _declare_event_types(pm)
    return pm


def check_plugin_settings(pm: pluggy.PluginManager, config: Config, names: list[str]) -> None:
    """:class:`ConfigError` for a block that names no plugin (``names``: every candidate) or
    that a plugin's ``validate_config`` refuses; at start-up and on reload alike."""
    source = f" (in {config.source})" if config.source else ""
    for name in config.plugins:
        if name not in names:
            retired = f": {RETIRED_PLUGINS[name]}" if name in RETIRED_PLUGINS else ""
            raise ConfigError(f"plugins.{name}: no such plugin{retired}{source}")
    for impl in reversed(pm.hook.validate_config.get_hookimpls()):
        try:
            errors = impl.function(config=config) or []
        except Exception as exc:  # a validator that breaks is a configuration problem too
            errors = [f"plugins.{impl.plugin_name}: {type(exc).__name__}: {exc}"]
        if errors:
            raise ConfigError(f"{errors[0]}{source}")


def plugin_candidates(config: Config) -> list[str]:
    """The names of every plugin that could load with ``config`` (enabled or not)."""
    return [c.name for c in _candidates(config)]


def _declare_event_types(pm: PluginManager) -> None:
    """Collect ``register_event_types``; a reserved or malformed name is a load error."""
    from .handlers.streams import TYPE_NAME

    for impl in pm.hook.register_event_types.get_hookimpls():
        try:
            types = tuple(impl.function() or ())
        except Exception as exc:
            raise PluginError(
                f"plugin {impl.plugin_name}: register_event_types: {type(exc).__name__}: {exc}"
            ) from None
        for name in types:
            problem = event_type_problem(name, TYPE_NAME)
            if problem:
                raise PluginError(f"plugin {impl.plugin_name}: register_event_types: {problem}")
        info = pm.info[impl.plugin_name]
        info.event_types = tuple(sorted(set(info.event_types) | set(types)))


def secret_settings(pm: pluggy.PluginManager) -> dict[str, frozenset[str]]:
    """Plugin name -> the setting names it declares secret (``secret_settings`` hook)."""
    found: dict[str, frozenset[str]] = {}
    for impl in pm.hook.secret_settings.get_hookimpls():
        try:
            names = impl.function() or ()
        except Exception as exc:
            raise PluginError(
                f"plugin {impl.plugin_name}: secret_settings: {type(exc).__name__}: {exc}"
            ) from None
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise PluginError(f"plugin {impl.plugin_name}: secret_settings: a list of names")
        found[impl.plugin_name] = frozenset(names)
    return found


def event_type_problem(name: Any, pattern: Any = None) -> str | None:
    """Why a plugin may not use ``name`` as an event type, or None."""
    if pattern is None:
        from .handlers.streams import TYPE_NAME as pattern
    if not isinstance(name, str) or not pattern.match(name):
        return f"event type {name!r}: must match {pattern.pattern}"
    if name in RESERVED_TYPES:
        return f"event type {name!r} is reserved for the core"
    return None


def plugin_list(pm: pluggy.PluginManager) -> list[dict[str, Any]]:
    """Name, version, source, hooks and declared event types of every registered plugin."""
    info = getattr(pm, "info", {})
    out = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        meta = info.get(name)
        out.append(
            {
                "name": name,
                "version": meta.version if meta else getattr(plugin, "__version__", None),
                "source": meta.source if meta else None,
                "origin": meta.origin if meta else None,
                "hooks": sorted(h.name for h in pm.get_hookcallers(plugin) or []),
                "event_types": list(meta.event_types) if meta else [],
            }
        )
    return sorted(out, key=lambda p: p["name"])


_FAILED = object()  # an implementation's result when it failed or timed out


class _Resume:
    """Awaits the rest of a coroutine whose first step already ran (``yield from`` after
    one ``send``): Python 3.12's eager task start, without a task."""

    def __init__(self, coro: Any, suspended_on: Any):
        self.coro = coro
        self.suspended_on = suspended_on

    def __await__(self) -> Any:
        coro, value = self.coro, self.suspended_on
        while True:
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation and the like go to the coroutine
                try:
                    value = coro.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    value = coro.send(sent)
                except StopIteration as done:
                    return done.value


class _Steps:
    """Awaits a plugin's coroutine step by step with :data:`running_hook` set around each
    step, so the loop watchdog can name a coroutine that blocks the loop."""

    def __init__(self, coro: Any, plugin: str, hook: str):
        self.coro, self.plugin, self.hook = coro, plugin, hook

    def __await__(self) -> Any:
        coro, sent, error = self.coro, None, None
        while True:
            running_hook.enter(self.plugin, self.hook)
            try:
                value = coro.send(sent) if error is None else coro.throw(error)
            except StopIteration as done:
                return done.value
            finally:
                running_hook.leave()
            sent, error = None, None
            try:
                sent = yield value
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # cancellation and the like go to the coroutine
                error = exc


async def _tracked(coro: Any, plugin: str, hook: str) -> Any:
    return await _Steps(coro, plugin, hook)


@dataclass
class HookFailure:
    """The failures of one plugin's implementation of one hook."""

    plugin: str
    hook: str
    failures: int = 0
    timeouts: int = 0
    last_error: str = ""
    last_at: str = ""
    failing: bool = False  # the most recent call failed

    def to_json(self) -> dict[str, Any]:
        return {
            "plugin": self.plugin,
            "hook": self.hook,
            "error": self.last_error,
            "at": self.last_at,
            "failures": self.failures,
            "timeouts": self.timeouts,
            "failing": self.failing,
        }


@dataclass
class _Call:
    plugin: str
    started: float
    task: asyncio.Future | None = None
    result: Any = None
    done: bool = field(default=False)


def _call_in_thread(impl: Any, hook: str, args: dict[str, Any]) -> Any:
    """Run a plain hook function on a thread of its plugin's pool, as its plugin."""
    with plugin_context(impl.plugin_name):
        result = impl.function(**args)
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()
        raise TypeError(f"{hook} returned an awaitable from a plain function")
    return result


TRACE_ENV = "QUOTASERVER_TRACE_PLUGINS"


def _trace(plugin: str, hook: str, seconds: float, where: str) -> None:
    log.info("trace: plugin %s %s %.3f ms %s", plugin, hook, seconds * 1000, where)


def _trace_when_done(future: asyncio.Future, plugin: str, hook: str, where: str) -> None:
    started = time.monotonic()
    future.add_done_callback(lambda f: _trace(plugin, hook, time.monotonic() - started, where))


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


@dataclass
class _PoolRun:
    """A hook call running in its plugin's pool, for a caller that does not wait on it."""

    future: asyncio.Future
    started: float
    late: bool = False  # its timeout has been counted

    def error(self) -> BaseException | None:
        if self.future.cancelled():
            return TimeoutError("cancelled")
        return self.future.exception()


class Hooks:
    """Calls every hook implementation in isolation from the others.

    One at a time for sync hooks (pluggy would stop a hook call at the first exception);
    awaitable results all at once, each bounded by ``timeout`` (``plugin_timeout``), so a
    hung implementation delays no other. Failures and timeouts are logged and counted.
    """

    def __init__(
        self, pm: pluggy.PluginManager, timeout: float = 5.0, max_payload: int = 64 * 1024
    ):
        self.pm = pm
        self.timeout = timeout
        #: plugin_max_payload_bytes: the largest event data or stats_fields of one plugin.
        self.max_payload = max_payload
        self.failures: dict[tuple[str, str], HookFailure] = {}
        self._abandoned: set[asyncio.Future] = set()
        #: Times each plugin blocked the event loop (over the watchdog's threshold).
        self.loop_blocks: dict[str, int] = {}
        #: Plugins whose hooks are no longer called: ``{plugin: reason}``.
        self.disabled: dict[str, str] = {}
        #: Set by the application: plain hook functions of third-party plugins run in their
        #: plugin's pool (``threads.pool(name)``) rather than on the event loop.
        self.threads: Any = None
        self._offload: dict[int, bool] = {}
        #: Offloaded ``stats_fields``: each plugin's run in its pool (future, started at)
        #: and the fields of its last run that finished, which the stats broadcast shows.
        self._stats_runs: dict[str, _PoolRun] = {}
        self._stats_last: dict[str, Any] = {}
        #: QUOTASERVER_TRACE_PLUGINS=1: log every hook call with its plugin and duration.
        self.trace = os.environ.get(TRACE_ENV, "") not in ("", "0")

    #: A plugin that blocks the event loop this many times has its hooks disabled.
    MAX_LOOP_BLOCKS = 3

    def loop_blocked(self, plugin: str | None, hook: str | None, seconds: float) -> None:
        """Count a block the watchdog saw; disable ``plugin`` at :attr:`MAX_LOOP_BLOCKS`."""
        if plugin is None or hook is None:
            return
        count = self.loop_blocks[plugin] = self.loop_blocks.get(plugin, 0) + 1
        self._failed(plugin, hook, TimeoutError(f"blocked the event loop ({seconds:.1f} s)"))
        if count >= self.MAX_LOOP_BLOCKS and plugin not in self.disabled:
            reason = f"blocked the event loop {count} times (last in {hook})"
            self.disabled[plugin] = reason
            log.error("plugin %s disabled: %s", plugin, reason)

    @property
    def errors(self) -> dict[str, str]:
        """The latest failure per plugin: ``{plugin: "hook: error"}``."""
        out: dict[str, tuple[str, str]] = {}
        for f in self.failures.values():
            if f.plugin not in out or f.last_at >= out[f.plugin][0]:
                out[f.plugin] = (f.last_at, f"{f.hook}: {f.last_error}")
        return {plugin: text for plugin, (_at, text) in out.items()}

    @property
    def failing(self) -> bool:
        """Whether the latest call of some plugin's hook failed or timed out."""
        return any(f.failing for f in self.failures.values())

    def failures_json(self, plugin: str | None = None) -> list[dict[str, Any]]:
        return [f.to_json() for f in self.failures.values() if plugin is None or f.plugin == plugin]

    # -- events and stats fields ---------------------------------------------------------
    def declare_event_types(self, plugin: str, types: tuple[str, ...]) -> None:
        """Record event types ``plugin`` emits; a reserved or malformed one is a PluginError."""
        for name in types:
            problem = event_type_problem(name)
            if problem:
                raise PluginError(f"plugin {plugin}: {problem}")
        info = getattr(self.pm, "info", {}).get(plugin)
        if info is not None:
            info.event_types = tuple(sorted(set(info.event_types) | set(types)))

    @property
    def event_types(self) -> dict[str, str]:
        """Every event type a plugin declared, with the plugin."""
        return {
            t: name for name, info in getattr(self.pm, "info", {}).items() for t in info.event_types
        }

    def event_refusal(self, plugin: str, type: str) -> str | None:
        """Why ``plugin`` may not emit an event of ``type`` now, or None.

        Core types are reserved (built-ins, part of the core, may publish them); any other
        type must have been declared by the plugin, so filters and the dashboard know it.
        """
        info = getattr(self.pm, "info", {}).get(plugin)
        if type in RESERVED_TYPES:
            if info is not None and info.source == "built-in":
                return None
            return f"plugin {plugin} may not emit {type!r}: the type is reserved for the core"
        if info is not None and type not in info.event_types:
            return (
                f"plugin {plugin} emits undeclared event type {type!r}: declare it in the "
                "emitter's event_types or with the register_event_types hook"
            )
        return None

    def payload_refusal(self, plugin: str, data: Any) -> str | None:
        """Why ``plugin``'s event ``data`` may not be published, or None: it must be a JSON
        mapping within ``plugin_max_payload_bytes`` (every event is stored and sent to every
        dashboard)."""
        if not isinstance(data, dict):
            return f"plugin {plugin}: event data must be a mapping, not {type(data).__name__}"
        try:
            size = _json_size(data)
        except (TypeError, ValueError) as exc:
            return f"plugin {plugin}: event data is not JSON: {exc}"
        if size > self.max_payload:
            return f"plugin {plugin}: event data is {size} bytes, over {self.max_payload}"
        return None

    def stats(self, app: Any, claims: dict[str, str], strict: bool = False) -> dict[str, Any]:
        """The ``stats_fields`` of every plugin; a field owned by another plugin is refused.

        ``claims`` maps the fields of emitters to their plugins. With ``strict`` (start-up) a
        clash is a :class:`PluginError` naming both plugins; later it is a failure of the
        second plugin's ``stats_fields`` and the first keeps the field.
        """
        owners = dict(claims)
        snapshot: dict[str, Any] = {}
        for plugin, fields in self._stats_results(app, strict):
            if not isinstance(fields, dict):
                continue
            problem = _stats_problem(plugin, fields, self.max_payload)
            if problem:  # one plugin's bad value must not stop the stats of every client
                if strict:
                    raise PluginError(problem)
                self._failed(plugin, "stats_fields", ValueError(problem))
                continue
            for key, value in fields.items():
                owner = owners.setdefault(key, plugin)
                if owner == plugin:
                    snapshot[key] = value
                    continue
                a, b = sorted((owner, plugin))
                problem = f"stats field {key!r} is claimed by plugins {a} and {b}"
                if strict:
                    raise PluginError(problem)
                self._failed(plugin, "stats_fields", ValueError(problem))
        return snapshot

    def _stats_results(self, app: Any, strict: bool) -> list[tuple[str, Any]]:
        """Every plugin's ``stats_fields``: called now, except a third party's plain function
        after start-up (``strict``), which runs in its plugin's pool and is shown from its
        last finished run (one stats interval old; a run still going is not started again,
        and one over ``plugin_timeout`` is a failure of that plugin)."""
        results = []
        for impl in self._impls("stats_fields"):
            plugin = impl.plugin_name
            if not strict and self._offloaded(impl):
                fields = self._offloaded_stats(impl, app)
            else:
                ok, fields = self._invoke(impl, "stats_fields", {"app": app}, awaitable=False)
                if not ok:
                    continue
                self._succeeded(plugin, "stats_fields")
                if self._offloaded(impl):  # start-up's call: shown until a run in the pool
                    self._stats_last[plugin] = fields
            if fields is not None:
                results.append((plugin, fields))
        return results

    def _offloaded_stats(self, impl: Any, app: Any) -> Any:
        plugin = impl.plugin_name
        run = self._stats_runs.get(plugin)
        if run is not None and not run.future.done():
            if not run.late and time.monotonic() - run.started > self.timeout:
                run.late = True  # one failure per run, however long it hangs
                error = TimeoutError(f"timed out after {self.timeout:g} s")
                self._failed(plugin, "stats_fields", error)
            return self._stats_last.get(plugin)
        if run is not None:
            error = run.error()
            if error is None:
                self._succeeded(plugin, "stats_fields")
                self._stats_last[plugin] = run.future.result()
            else:
                self._failed(plugin, "stats_fields", error)
                self._stats_last.pop(plugin, None)
        future = self._hand_off(impl, "stats_fields", {"app": app})
        if future is not None:
            # Read here at the next broadcast; retrieved now so that a run still going when
            # the app stops is not reported as an exception nobody retrieved.
            future.add_done_callback(_retrieved)
            self._stats_runs[plugin] = _PoolRun(future, time.monotonic())
        return self._stats_last.get(plugin)

    def isolated(self, emitter: Any, plugin: str) -> Any:
        """``emitter`` as it runs: a third party's periodic emitter whose ``collect`` is a
        plain function runs it on the emitter's own thread (``blocking=True``), so a
        ``collect`` that sleeps costs that source, not the event loop."""
        if (
            isinstance(emitter, PeriodicEmitter)
            and not emitter.blocking
            and self.third_party(plugin)
            and not inspect.iscoroutinefunction(emitter.collect)
        ):
            return dataclasses.replace(emitter, blocking=True)
        return emitter

    def third_party(self, plugin: str) -> bool:
        """Whether ``plugin`` came from an entry point or a plugins directory."""
        info = getattr(self.pm, "info", {}).get(plugin)
        return info is not None and info.source != "built-in"

    def json_results(self, hook: str, **kwargs: Any) -> dict[str, dict[str, Any]]:
        """``{plugin: mapping}`` of a hook whose results are JSON mappings; a result that
        is not one is refused as a failure of that plugin's hook (and left out)."""
        out = {}
        for plugin, result in self.call(hook, **kwargs):
            try:
                if not isinstance(result, dict):
                    raise TypeError(f"returned {type(result).__name__}, not a mapping")
                json.dumps(result)
            except (TypeError, ValueError) as exc:
                self.refuse(plugin, hook, exc)
                continue
            out[plugin] = result
        return out

    def refuse(self, plugin: str, hook: str, exc: BaseException) -> None:
        """Count what ``plugin`` returned from ``hook`` as a failure (the host refused it)."""
        self._failed(plugin, hook, exc)

    # -- calling --------------------------------------------------------------------------
    def _impls(self, hook: str) -> list[Any]:
        impls = reversed(getattr(self.pm.hook, hook).get_hookimpls())
        if self.disabled:
            return [i for i in impls if i.plugin_name not in self.disabled]
        return list(impls)

    def _invoke(
        self, impl: Any, hook: str, kwargs: dict[str, Any], awaitable: bool
    ) -> tuple[bool, Any]:
        """Call one implementation as its plugin; ``(ok, result)``.

        Without ``awaitable``, an awaitable result is an error (a plain-function hook).
        """
        started = time.monotonic()
        token = current_plugin.set(impl.plugin_name)  # (not plugin_context: the hot path)
        running_hook.enter(impl.plugin_name, hook)
        try:
            result = impl.function(**{k: kwargs[k] for k in impl.argnames})
            if not awaitable and inspect.isawaitable(result):
                if inspect.iscoroutine(result):
                    result.close()
                raise TypeError(f"{hook} must be a plain function, not async")
        except Exception as exc:
            self._failed(impl.plugin_name, hook, exc)
            return False, None
        finally:
            running_hook.leave()
            current_plugin.reset(token)
        # An awaitable is traced when awaited (quotaserver's _complete), not here.
        where = None if inspect.isawaitable(result) else "on the event loop"
        self._held(impl.plugin_name, hook, time.monotonic() - started, where)
        return True, result

    def _held(self, plugin: str, hook: str, seconds: float, where: str | None) -> None:
        """After a call on the loop: trace it (``where``), and count one that held the loop
        longer than the timeout as a failure (a sync call cannot be interrupted)."""
        if self.trace and where is not None:
            _trace(plugin, hook, seconds, where)
        if seconds > self.timeout:
            self._failed(plugin, hook, TimeoutError(f"blocked the event loop for {seconds:.1f} s"))

    def call(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        """Call every implementation of ``hook``; return ``(plugin name, result)`` pairs."""
        results = []
        for impl in self._impls(hook):
            ok, result = self._invoke(impl, hook, kwargs, awaitable=False)
            if ok:
                self._succeeded(impl.plugin_name, hook)
                if result is not None:
                    results.append((impl.plugin_name, result))
        return results

    async def call_async(
        self, hook: str, timeout: float | None = None, **kwargs: Any
    ) -> list[tuple[str, Any]]:
        """Like :meth:`call`, awaiting awaitable results concurrently, each within the timeout."""
        limit = self.timeout if timeout is None else min(timeout, self.timeout)
        return await self._complete(hook, self._start(hook, kwargs), limit)

    def react(self, hook: str, **kwargs: Any) -> Awaitable[list[tuple[str, Any]]] | None:
        """Call ``hook``'s implementations now, for a reaction nobody waits on.

        None when every implementation has finished (plain functions, or coroutines that
        returned without suspending: the common case, and no task is needed for it);
        otherwise an awaitable that finishes the rest as :meth:`call_async` does, for the
        caller to run in the background.
        """
        calls = self._start(hook, kwargs)
        for _name, result in calls:
            if inspect.isawaitable(result):
                return self._complete(hook, calls, self.timeout)
        for name, _result in calls:
            self._succeeded(name, hook)
        return None

    def react_each(
        self, hook: str, name: str, values: list[Any], **kwargs: Any
    ) -> Awaitable[list[tuple[str, Any]]] | None:
        """:meth:`react` once for each of ``values`` as the argument ``name`` (a batch's
        decisions): the same calls in the same order, with the isolation bookkeeping (the
        running plugin and hook, the watchdog's note, the timing) done once per
        implementation instead of once per call. A failing call is counted and the next
        value still goes to that implementation."""
        copied = self.COPIED.get(hook) == name  # each implementation its own copy
        waiting: list[tuple[str, Any]] = []
        for impl in self._impls(hook):
            plugin = impl.plugin_name
            own = [copy.deepcopy(v) for v in values] if copied else values
            if self._offloaded(impl):
                for value in own:
                    future = self._hand_off(impl, hook, {**kwargs, name: value})
                    if future is not None:
                        waiting.append((plugin, future))
                continue
            ok, awaitables = self._invoke_each(impl, hook, kwargs, name, own)
            waiting += awaitables
            if ok and not awaitables:
                self._succeeded(plugin, hook)
        return self._complete(hook, waiting, self.timeout) if waiting else None

    def _invoke_each(
        self, impl: Any, hook: str, kwargs: dict[str, Any], name: str, values: list[Any]
    ) -> tuple[bool, list[tuple[str, Any]]]:
        plugin = impl.plugin_name
        ok, awaitables = True, []
        started = time.monotonic()
        token = current_plugin.set(plugin)
        running_hook.enter(plugin, hook)
        try:
            for value in values:
                args = {k: value if k == name else kwargs[k] for k in impl.argnames}
                try:
                    result = impl.function(**args)
                except Exception as exc:
                    self._failed(plugin, hook, exc)
                    ok = False
                    continue
                if inspect.isawaitable(result):
                    awaitables.append((plugin, result))
        finally:
            running_hook.leave()
            current_plugin.reset(token)
        where = f"on the event loop, {len(values)} calls"
        self._held(plugin, hook, time.monotonic() - started, where)
        return ok, awaitables

    def _start(self, hook: str, kwargs: dict[str, Any]) -> list[tuple[str, Any]]:
        calls: list[tuple[str, Any]] = []
        copied = self.COPIED.get(hook)
        original = kwargs.get(copied) if copied else None
        for impl in self._impls(hook):
            if copied:  # each implementation its own copy: none sees another's changes
                kwargs = {**kwargs, copied: copy.deepcopy(original)}
            if self._offloaded(impl):
                future = self._hand_off(impl, hook, kwargs)
                if future is not None:
                    calls.append((impl.plugin_name, future))
                continue
            ok, result = self._invoke(impl, hook, kwargs, awaitable=True)
            if ok:
                calls.append((impl.plugin_name, result))
        return calls

    def _offloaded(self, impl: Any) -> bool:
        """Whether ``impl`` is a plain function of a third-party plugin (run in its pool)."""
        key = id(impl)
        offload = self._offload.get(key)
        if offload is None:
            third_party = self.third_party(impl.plugin_name)
            offload = third_party and not inspect.iscoroutinefunction(impl.function)
            self._offload[key] = offload
        return offload and self.threads is not None

    def _hand_off(self, impl: Any, hook: str, kwargs: dict[str, Any]) -> Any:
        """Submit a plain implementation to its plugin's pool: an asyncio future, or None
        (a failure recorded) when the pool is full of hung calls or shut down."""
        plugin = impl.plugin_name
        try:
            pool = self.threads.pool(plugin)
            if pool.busy >= pool.workers:
                raise TimeoutError(f"all {pool.workers} threads of the plugin are hung")
            args = {k: kwargs[k] for k in impl.argnames}
            future = asyncio.wrap_future(pool.submit(_call_in_thread, impl, hook, args))
            if self.trace:
                _trace_when_done(future, plugin, hook, "in its pool")
            return future
        except (RuntimeError, TimeoutError) as exc:
            self._failed(plugin, hook, exc)
            return None

    async def _complete(
        self, hook: str, calls: list[tuple[str, Any]], limit: float
    ) -> list[tuple[str, Any]]:
        waiting = [i for i, (_n, r) in enumerate(calls) if inspect.isawaitable(r)]
        if len(waiting) == 1 and hook not in self.LIFECYCLE:
            # Nothing to run alongside: await it in place (a task and a wait would cost
            # ~50 us per consume for on_decision, for no isolation gained).
            name, awaitable = calls[waiting[0]]
            started, coroutine = time.monotonic(), inspect.iscoroutine(awaitable)
            calls[waiting[0]] = (name, await self._await_inline(name, hook, awaitable, limit))
            if self.trace and coroutine:  # (a pool's future is traced by _hand_off)
                _trace(name, hook, time.monotonic() - started, "awaited")
        elif waiting:
            tasks = {}
            for i in waiting:
                name, awaitable = calls[i]
                coroutine = inspect.iscoroutine(awaitable)
                if coroutine:
                    awaitable = _tracked(awaitable, name, hook)
                with plugin_context(name):  # the task's threads come from the plugin's pool
                    tasks[i] = asyncio.ensure_future(awaitable)
                if self.trace and coroutine:
                    _trace_when_done(tasks[i], name, hook, "awaited")
                calls[i] = (name, tasks[i])
            await self._await_tasks(list(tasks.values()), limit)
            for i, task in tasks.items():
                calls[i] = (calls[i][0], self._outcome(calls[i][0], hook, task, limit))
        results = []
        for name, result in calls:
            if result is _FAILED:
                continue
            self._succeeded(name, hook)
            if result is not None:
                results.append((name, result))
        return results

    #: Hooks whose argument each implementation receives a deep copy of (rare, small).
    COPIED = {"on_violation": "violation"}

    #: Never awaited in place: a stop must not wait on a plugin that ignores cancellation.
    LIFECYCLE = frozenset({"startup", "shutdown"})

    async def _await_inline(self, plugin: str, hook: str, awaitable: Any, limit: float) -> Any:
        token = current_plugin.set(plugin)
        try:
            if inspect.iscoroutine(awaitable):
                # Run the first step now: most reactions finish without suspending, and
                # then need no timer at all.
                running_hook.enter(plugin, hook)
                try:
                    suspended_on = awaitable.send(None)
                except StopIteration as done:
                    return done.value
                finally:
                    running_hook.leave()
                awaitable = _Resume(awaitable, suspended_on)
            timer = asyncio.timeout(limit)
            try:
                async with timer:
                    return await awaitable
            except TimeoutError as exc:
                ours = timer.expired()
                error = TimeoutError(f"timed out after {limit:g} s") if ours else exc
                self._failed(plugin, hook, error)
        except Exception as exc:
            self._failed(plugin, hook, exc)
        finally:
            current_plugin.reset(token)
        return _FAILED

    async def _await_tasks(self, tasks: list[asyncio.Future], limit: float) -> None:
        try:
            await asyncio.wait(tasks, timeout=limit)
        except asyncio.CancelledError:  # the caller gave up (shutdown): so do they
            for task in tasks:
                self._abandon(task)
            raise

    def _outcome(self, plugin: str, hook: str, task: asyncio.Future, limit: float) -> Any:
        if not task.done():
            self._abandon(task)
            self._failed(plugin, hook, TimeoutError(f"timed out after {limit:g} s"))
        elif task.cancelled():
            self._failed(plugin, hook, TimeoutError("cancelled"))
        elif task.exception() is not None:
            self._failed(plugin, hook, task.exception())
        else:
            return task.result()
        return _FAILED

    def _abandon(self, task: asyncio.Future) -> None:
        # Cancel, but never wait: an implementation that ignores cancellation must not
        # hold up the caller. The reference keeps the task alive until it ends.
        task.cancel()
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned.discard)

    def _record(self, plugin: str, hook: str) -> HookFailure:
        key = (plugin, hook)
        if key not in self.failures:
            self.failures[key] = HookFailure(plugin, hook)
        return self.failures[key]

    def _succeeded(self, plugin: str, hook: str) -> None:
        failure = self.failures.get((plugin, hook))
        if failure is not None:
            failure.failing = False

    def _failed(self, plugin: str, hook: str, exc: BaseException) -> None:
        failure = self._record(plugin, hook)
        failure.failures += 1
        failure.failing = True
        failure.last_at = isoformat(utc_now())
        if isinstance(exc, TimeoutError):
            failure.timeouts += 1
            failure.last_error = "timed out"
            log.error("plugin %s: %s timed out (%s)", plugin, hook, exc or "no detail")
        else:
            failure.last_error = f"{type(exc).__name__}: {exc}"[:500]
            log.error("plugin %s failed in %s: %s", plugin, hook, exc, exc_info=exc)


def _json_size(value: Any) -> int:
    """Bytes of ``value`` as compact JSON; TypeError or ValueError if it is not JSON."""
    return len(json.dumps(value, allow_nan=False, separators=(",", ":")).encode())


def _stats_problem(plugin: str, fields: dict[str, Any], limit: int) -> str | None:
    """Why a plugin's ``stats_fields`` result may not reach clients, or None."""
    try:
        size = _json_size(fields)
    except (TypeError, ValueError) as exc:
        return f"plugin {plugin}: stats_fields returned a value that is not JSON: {exc}"
    if size > limit:
        return f"plugin {plugin}: stats_fields returned {size} bytes, over {limit}"
    return None


def check_setup(config: Config, pm: pluggy.PluginManager) -> dict[str, dict[str, Any]]:
    """What start-up would refuse about the plugins' emitters, without starting anything.

    For ``check-config``: runs start-up's :meth:`QuotaApp.register_sources` on an
    application over a throw-away database, so a duplicate emitter or stats field is a
    :class:`PluginError` here too. Nothing is started (no ``startup`` hook, no emitter).
    Returns what each plugin registered: ``{plugin: {"emitters": [...], "stats_fields":
    [...]}}`` (``quotaserver plugins`` lists it).
    """
    import tempfile

    from .app import QuotaApp

    async def dry_run(directory: str) -> dict[str, dict[str, Any]]:
        # No backplane: emitters do not need one, and under --workers the secret a Redis
        # backplane needs may be the launcher's to generate (a traceback here otherwise).
        dry = config.with_overrides(
            database__url=f"sqlite:///{directory}/check.db",
            auth__token_file=f"{directory}/admin_token",
            auth__cookie_secret="check-config",
            backplane__url="",
            server__workers=1,
        )
        app = QuotaApp(dry, plugin_manager=pm)  # env tokens as start-up sees them
        try:
            app.register_sources()
            summary: dict[str, dict[str, Any]] = {}
            for plugin, emitters in app.scheduler.describe().items():
                summary.setdefault(plugin, {})["emitters"] = emitters
            for plugin, fields in app.hooks.call("stats_fields", app=app):
                if isinstance(fields, dict):
                    summary.setdefault(plugin, {})["stats_fields"] = sorted(fields)
            return summary
        finally:
            app.store.close()

    with tempfile.TemporaryDirectory(prefix="quotaserver-check-") as directory:
        return asyncio.run(dry_run(directory))
