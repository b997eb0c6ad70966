"""Data-source emitters registered by plugins, and the scheduler that runs them in isolation.

A :class:`PeriodicEmitter` is called every ``interval`` seconds; a :class:`EventEmitter` is
started once with an ``emit`` callable and stopped at shutdown. A source that raises or
hangs is logged, backed off and reported unhealthy; the others and every client go on.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

Emit = Callable[[str, dict[str, Any]], Awaitable[Any]]


@dataclass
class PeriodicEmitter:
    """Call ``collect()`` every ``interval`` seconds.

    ``collect`` may be sync or async; with ``blocking=True`` it runs on its own thread
    (for psutil, disk or network work). A result that is not None becomes the stats field
    named ``stats_field`` (when set) in the next stats broadcast.
    """

    name: str
    interval: float
    collect: Callable[[], Any]
    blocking: bool = False
    timeout: float | None = None  # default: max(interval, 1 s)
    stats_field: str | None = None


@dataclass
class EventEmitter:
    """Started once with ``emit(type, data)`` (persist, then publish); stopped at shutdown."""

    name: str
    start: Callable[[Emit], Any]
    stop: Callable[[], Any] | None = None


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
            "last_run": self.last_run,
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
        emit: Emit,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
    ):
        self.emit = emit
        # Injectable so that tests drive back-off and timestamps without waiting.
        self._sleep = sleep
        self._clock = clock
        self.sources: dict[str, SourceHealth] = {}
        self._periodic: list[tuple[PeriodicEmitter, SourceHealth]] = []
        self._event: list[tuple[EventEmitter, SourceHealth]] = []
        self._tasks: list[asyncio.Task] = []
        self._executors: dict[str, ThreadPoolExecutor] = {}
        self._running = False

    def add(self, emitter: PeriodicEmitter | EventEmitter, plugin: str) -> None:
        if emitter.name in self.sources:
            raise ValueError(f"duplicate emitter name {emitter.name!r} (plugin {plugin})")
        kind = "periodic" if isinstance(emitter, PeriodicEmitter) else "event"
        health = SourceHealth(emitter.name, plugin, kind)
        self.sources[emitter.name] = health
        if isinstance(emitter, PeriodicEmitter):
            self._periodic.append((emitter, health))
        else:
            self._event.append((emitter, health))

    def stats_fields(self) -> dict[str, Any]:
        """Latest values of periodic emitters that publish a stats field."""
        return {
            e.stats_field: h.last_value
            for e, h in self._periodic
            if e.stats_field and h.last_value is not None
        }

    async def start(self) -> None:
        self._running = True
        for emitter, health in self._event:
            try:
                await maybe_await(emitter.start(self.emit))
                health.runs += 1
                health.last_run = self._clock()
            except Exception as exc:
                self._failed(health, exc)
        for emitter, health in self._periodic:
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
                await maybe_await(emitter.stop())
            except Exception as exc:
                self._failed(health, exc)

        stopping = [
            asyncio.ensure_future(stop_one(e, h)) for e, h in self._event if e.stop is not None
        ]
        if stopping:
            done, late = await asyncio.wait(stopping, timeout=timeout)
            for task in late:
                task.cancel()
                log.warning("an event emitter did not stop within %s s", timeout)
        for executor in self._executors.values():
            executor.shutdown(wait=False, cancel_futures=True)

    async def run_once(self, name: str) -> Any:
        """Run one periodic emitter now (used at start-up and by tests)."""
        for emitter, health in self._periodic:
            if emitter.name == name:
                return await self._run(emitter, health, self._executor_for(emitter))
        raise KeyError(name)

    def _executor_for(self, emitter: PeriodicEmitter) -> ThreadPoolExecutor | None:
        if not emitter.blocking:
            return None
        executor = self._executors.get(emitter.name)
        if executor is None:
            # One thread per blocking source: a hung source cannot starve the others.
            executor = ThreadPoolExecutor(1, thread_name_prefix=f"emitter-{emitter.name}")
            self._executors[emitter.name] = executor
        return executor

    async def _run(
        self, emitter: PeriodicEmitter, health: SourceHealth, executor: ThreadPoolExecutor | None
    ) -> Any:
        if health.running:
            raise TimeoutError("previous run still in progress")
        timeout = emitter.timeout or max(emitter.interval, 1.0)
        health.running = True
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
        # that races with completion, which left a stopped scheduler waiting forever.
        try:
            if executor is not None:
                future = asyncio.get_running_loop().run_in_executor(executor, emitter.collect)
                # Leave the thread alone if it hangs; "running" stays set until it returns.
                future.add_done_callback(lambda f: setattr(health, "running", False))
                async with asyncio.timeout(timeout):
                    value = await asyncio.shield(future)
            else:
                async with asyncio.timeout(timeout):
                    value = await maybe_await(emitter.collect())
                health.running = False
        except BaseException:
            if executor is None:
                health.running = False
            raise
        health.runs += 1
        health.consecutive_failures = 0
        health.last_run = self._clock()
        if value is not None:
            health.last_value = value
        return value

    async def _loop(self, emitter: PeriodicEmitter, health: SourceHealth) -> None:
        executor = self._executor_for(emitter)
        delay = emitter.interval
        while self._running:
            try:
                await self._run(emitter, health, executor)
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
