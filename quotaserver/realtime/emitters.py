"""Data-source emitters registered by plugins, and the scheduler that runs them in isolation.

A :class:`PeriodicEmitter` is called every ``interval`` seconds; a :class:`EventEmitter` is
started once with an ``emit`` callable and stopped at shutdown. A source that raises or
hangs is logged, backed off and reported unhealthy; the others and every client go on.
Every emitter runs as its plugin (:func:`~quotaserver.isolation.plugin_context`), blocking
work on a thread of its own, never on the loop's shared executor.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from ..config import ConfigError
from ..isolation import ThreadPool, plugin_context, running_hook
from ..windows import isoformat

log = logging.getLogger(__name__)

#: ``emit(type, data, durable=True)``: awaitable on the loop; from a thread it blocks
#: until the event is published and returns the message.
Emit = Callable[..., Any]
#: ``publish(type, data, durable=..., plugin=...)``: the host's persist-then-publish.
Publish = Callable[..., Awaitable[Any]]


class PluginError(ConfigError):
    """A plugin cannot load or be set up; the message names the plugin (exit status 2)."""


@dataclass
class PeriodicEmitter:
    """Call ``collect()`` every ``interval`` seconds.

    ``collect`` may be sync or async; with ``blocking=True`` it runs on its own thread
    (for psutil, disk or network work). A result that is not None becomes the stats field
    named ``stats_field`` (when set) in the next stats broadcast. A ``collect`` that takes
    one argument gets ``emit`` (see :class:`EventEmitter`); ``event_types`` declares what
    it emits.
    """

    name: str
    interval: float
    collect: Callable[..., Any]
    blocking: bool = False
    timeout: float | None = None  # default: max(interval, 1 s)
    stats_field: str | None = None
    event_types: tuple[str, ...] = ()


@dataclass
class EventEmitter:
    """Started once with ``emit(type, data, durable=True)``; stopped at shutdown.

    ``emit`` persists the event, then publishes it (``durable=False``: published live only,
    without a seq, never replayed). With ``blocking=True``, ``start`` and ``stop`` run on a
    thread of the emitter's own, where ``emit`` blocks until the event is out. The types it
    emits must be declared in ``event_types`` (or by the ``register_event_types`` hook).
    """

    name: str
    start: Callable[[Emit], Any]
    stop: Callable[[], Any] | None = None
    event_types: tuple[str, ...] = ()
    blocking: bool = False


@dataclass
class SourceHealth:
    name: str
    plugin: str
    kind: str
    runs: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    last_run: float | None = None
    last_error: str | None = None
    last_value: Any = None
    running: bool = False

    @property
    def healthy(self) -> bool:
        return self.consecutive_failures == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "plugin": self.plugin,
            "kind": self.kind,
            "healthy": self.healthy,
            "runs": self.runs,
            "failures": self.failures,
            # RFC 3339 like every other time in the API (kept as epoch seconds internally).
            "last_run": (
                isoformat(datetime.fromtimestamp(self.last_run, UTC))
                if self.last_run is not None
                else None
            ),
            "last_error": self.last_error,
        }


async def maybe_await(value: Any) -> Any:
    """Await ``value`` if it is awaitable (plugins may be sync or async)."""
    if inspect.isawaitable(value):
        return await value
    return value


class Scheduler:
    """Runs every registered emitter; isolates failures; reports health."""

    MAX_BACKOFF = 60.0

    def __init__(
        self,
        publish: Publish,
        declare: Callable[[str, tuple[str, ...]], None] | None = None,
        emit_timeout: float = 5.0,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
    ):
        self.publish = publish
        self.declare = declare
        self.emit_timeout = emit_timeout
        # Injectable so that tests drive back-off and timestamps without waiting.
        self._sleep = sleep
        self._clock = clock
        self.sources: dict[str, SourceHealth] = {}
        #: stats field -> the plugin whose emitter publishes it
        self.stats_claims: dict[str, str] = {}
        self._periodic: list[tuple[PeriodicEmitter, SourceHealth]] = []
        self._event: list[tuple[EventEmitter, SourceHealth]] = []
        self._tasks: list[asyncio.Task] = []
        self._pools: dict[str, ThreadPool] = {}
        self._running = False

    def describe(self) -> dict[str, list[dict[str, Any]]]:
        """The registered emitters by plugin: name, kind, interval, stats field, types."""
        out: dict[str, list[dict[str, Any]]] = {}
        for emitter, health in [*self._periodic, *self._event]:
            entry: dict[str, Any] = {"name": emitter.name, "kind": health.kind}
            if isinstance(emitter, PeriodicEmitter):
                entry["interval"] = emitter.interval
                if emitter.stats_field:
                    entry["stats_field"] = emitter.stats_field
            if emitter.event_types:
                entry["event_types"] = list(emitter.event_types)
            out.setdefault(health.plugin, []).append(entry)
        return out

    def add(self, emitter: PeriodicEmitter | EventEmitter, plugin: str) -> None:
        """Register ``emitter`` of ``plugin``; a clash is a :class:`PluginError`."""
        if not isinstance(emitter, PeriodicEmitter | EventEmitter):
            raise PluginError(
                f"plugin {plugin}: register_emitters returned {type(emitter).__name__}, "
                "not a PeriodicEmitter or EventEmitter"
            )
        if emitter.name in self.sources:
            other = self.sources[emitter.name].plugin
            raise PluginError(
                f"plugin {plugin}: duplicate emitter name {emitter.name!r} "
                f"(already registered by plugin {other})"
            )
        field = getattr(emitter, "stats_field", None)
        if field and self.stats_claims.get(field, plugin) != plugin:
            a, b = sorted((self.stats_claims[field], plugin))
            raise PluginError(f"stats field {field!r} is claimed by plugins {a} and {b}")
        if self.declare is not None and emitter.event_types:
            self.declare(plugin, tuple(emitter.event_types))
        if field:
            self.stats_claims[field] = plugin
        kind = "periodic" if isinstance(emitter, PeriodicEmitter) else "event"
        health = SourceHealth(emitter.name, plugin, kind)
        self.sources[emitter.name] = health
        if isinstance(emitter, PeriodicEmitter):
            self._periodic.append((emitter, health))
        else:
            self._event.append((emitter, health))

    def emit_for(self, plugin: str) -> Emit:
        """The ``emit`` of ``plugin``'s emitters: usable on the loop and from its threads."""
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()

        def emit(type: str, data: dict[str, Any], durable: bool = True) -> Any:
            work = self.publish(type, data, durable=durable, plugin=plugin)
            if threading.get_ident() == loop_thread:
                return asyncio.ensure_future(work)
            return asyncio.run_coroutine_threadsafe(work, loop).result(self.emit_timeout)

        return emit

    def stats_fields(self) -> dict[str, Any]:
        """Latest values of periodic emitters that publish a stats field."""
        return {
            e.stats_field: h.last_value
            for e, h in self._periodic
            if e.stats_field and h.last_value is not None
        }

    async def start(self, timeout: float = 5.0) -> None:
        """Start event emitters (each within ``timeout``), then the periodic loops."""
        self._running = True
        for emitter, health in self._event:
            try:
                with plugin_context(health.plugin):
                    emit = self.emit_for(health.plugin)
                    if emitter.blocking:
                        work = asyncio.wrap_future(self._pool(health).submit(emitter.start, emit))
                    else:
                        work = asyncio.ensure_future(maybe_await(emitter.start(emit)))
                done, _ = await asyncio.wait([work], timeout=timeout)
                if not done:
                    work.cancel()
                    raise TimeoutError
                work.result()
                health.runs += 1
                health.last_run = self._clock()
            except Exception as exc:
                self._failed(health, exc)
        for emitter, health in self._periodic:
            with plugin_context(health.plugin):
                self._tasks.append(asyncio.create_task(self._loop(emitter, health)))

    async def stop(self, timeout: float = 3.0) -> None:
        """Cancel periodic emitters; give event emitters' ``stop`` ``timeout`` s in total."""
        self._running = False
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

        async def stop_one(emitter: EventEmitter, health: SourceHealth) -> None:
            try:
                if emitter.blocking:
                    await asyncio.wrap_future(self._pool(health).submit(emitter.stop))
                else:
                    await maybe_await(emitter.stop())
            except Exception as exc:
                self._failed(health, exc)

        stopping = []
        for emitter, health in self._event:
            if emitter.stop is not None:
                with plugin_context(health.plugin):
                    stopping.append(asyncio.ensure_future(stop_one(emitter, health)))
        if stopping:
            done, late = await asyncio.wait(stopping, timeout=timeout)
            for task in late:
                task.cancel()
                log.warning("an event emitter did not stop within %s s", timeout)
        for pool in self._pools.values():
            pool.shutdown()  # hung threads are daemons: they cannot hold the process

    async def run_once(self, name: str) -> Any:
        """Run one periodic emitter now (used at start-up and by tests)."""
        for emitter, health in self._periodic:
            if emitter.name == name:
                with plugin_context(health.plugin):
                    pool = self._pool(health) if emitter.blocking else None
                    return await self._run(emitter, health, pool)
        raise KeyError(name)

    def _pool(self, health: SourceHealth) -> ThreadPool:
        pool = self._pools.get(health.name)
        if pool is None:
            # One thread per blocking source: a hung source cannot starve the others.
            pool = ThreadPool(f"emitter-{health.name}", 1)
            self._pools[health.name] = pool
        return pool

    def _collect(self, emitter: PeriodicEmitter, plugin: str) -> Callable[[], Any]:
        try:
            wants_emit = len(inspect.signature(emitter.collect).parameters) == 1
        except (TypeError, ValueError):  # builtins without a signature
            wants_emit = False
        if not wants_emit:
            return emitter.collect
        emit = self.emit_for(plugin)
        return lambda: emitter.collect(emit)

    async def _run(
        self, emitter: PeriodicEmitter, health: SourceHealth, pool: ThreadPool | None
    ) -> Any:
        if health.running:
            raise TimeoutError("previous run still in progress")
        timeout = emitter.timeout or max(emitter.interval, 1.0)
        collect = self._collect(emitter, health.plugin)
        health.running = True
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that races with completion, which left a stopped scheduler waiting forever.
        try:
            if pool is not None:
                future = asyncio.wrap_future(pool.submit(collect))
                # Leave the thread alone if it hangs; "running" stays set until it returns.
                future.add_done_callback(lambda f: setattr(health, "running", False))
                async with asyncio.timeout(timeout):
                    value = await asyncio.shield(future)
            else:
                running_hook.enter(health.plugin, "collect")
                try:
                    result = collect()
                finally:
                    running_hook.leave()
                async with asyncio.timeout(timeout):
                    value = await maybe_await(result)
                health.running = False
        except BaseException:
            if pool is None:
                health.running = False
            raise
        health.runs += 1
        health.consecutive_failures = 0
        health.last_run = self._clock()
        if value is not None:
            health.last_value = value
        return value

    async def _loop(self, emitter: PeriodicEmitter, health: SourceHealth) -> None:
        pool = self._pool(health) if emitter.blocking else None
        delay = emitter.interval
        while self._running:
            try:
                await self._run(emitter, health, pool)
                delay = emitter.interval
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(health, exc)
                delay = min(
                    emitter.interval * 2 ** min(health.consecutive_failures, 10),
                    max(self.MAX_BACKOFF, emitter.interval),
                )
            await self._sleep(delay)

    def _failed(self, health: SourceHealth, exc: BaseException) -> None:
        health.failures += 1
        health.consecutive_failures += 1
        health.last_run = self._clock()
        text = "timed out" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
        health.last_error = text[:500]
        log.warning("source %s (plugin %s) failed: %s", health.name, health.plugin, text)
