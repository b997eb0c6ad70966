"""Plugin threads: a bounded pool per plugin, daemon threads, routed by the calling plugin.

Plugin code runs under :func:`plugin_context`, which sets :data:`current_plugin`. The
application installs :class:`PluginThreads` as the event loop's default executor, so even a
plugin that calls ``asyncio.to_thread`` or ``run_in_executor(None, ...)`` gets a thread of
its own pool: a plugin whose threads hang exhausts its pool only, never another plugin's or
the core's. The threads are daemon threads that nothing joins, so a stuck one cannot keep
the process from exiting (``ThreadPoolExecutor`` workers are joined at interpreter exit).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)

#: Set when an application starts stopping (see :func:`exit_guard`).
stop_requested = threading.Event()

#: The plugin whose code is running (None: the core).
current_plugin: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "quotaserver_plugin", default=None
)


class RunningHook:
    """Which plugin hook the event loop's thread is running now (the host sets it around
    each call); read by the watchdogs in other threads, so plain attributes, no lock."""

    __slots__ = ("plugin", "hook", "started")

    def __init__(self) -> None:
        self.plugin: str | None = None
        self.hook: str | None = None
        self.started = 0.0

    def enter(self, plugin: str, hook: str) -> None:
        self.plugin, self.hook, self.started = plugin, hook, time.monotonic()

    def leave(self) -> None:
        self.plugin = self.hook = None

    def describe(self) -> str:
        plugin, hook, started = self.plugin, self.hook, self.started
        if plugin is None:
            return "no plugin hook was running"
        return f"plugin {plugin} was running {hook} for {time.monotonic() - started:.1f} s"


#: The hook the loop's thread is in (one loop per process serves plugin calls).
running_hook = RunningHook()


@contextlib.contextmanager
def plugin_context(name: str | None) -> Iterator[None]:
    """Run the block (and every task or thread call it starts) as plugin ``name``."""
    token = current_plugin.set(name)
    try:
        yield
    finally:
        current_plugin.reset(token)


class ThreadPool:
    """At most ``workers`` daemon threads; work beyond that waits in the queue.

    Threads start on demand and end after ``idle`` seconds without work.
    """

    def __init__(self, name: str, workers: int, idle: float = 30.0):
        self.name = name
        self.workers = workers
        self.idle = idle
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._busy = 0
        self._lock = threading.Lock()
        self._closed = False

    @property
    def busy(self) -> int:
        """Threads running work now (a hung call stays counted until it returns)."""
        return self._busy

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
        if self._closed:
            raise RuntimeError(f"thread pool {self.name} is shut down")
        future: Future = Future()
        with self._lock:
            self._queue.put((future, fn, args, kwargs))
            started = len(self._threads)
            if self._busy + self._queue.qsize() > started and started < self.workers:
                thread = threading.Thread(
                    target=self._work, name=f"{self.name}-{started}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        return future

    def _work(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.idle)
            except queue.Empty:
                with self._lock:  # submit counts threads under the same lock
                    if self._queue.empty():
                        self._threads.remove(threading.current_thread())
                        return
                continue
            if item is None:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            with self._lock:
                self._busy += 1
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the awaiting caller
                future.set_exception(exc)
            else:
                future.set_result(result)
            finally:
                with self._lock:
                    self._busy -= 1

    def shutdown(self) -> None:
        """Refuse new work, cancel queued work, let idle threads end; never wait."""
        self._closed = True
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)


class PluginThreads(ThreadPoolExecutor):
    """The loop's default executor: each plugin gets its own bounded pool, the core one too.

    (asyncio accepts only a ``ThreadPoolExecutor`` as the default executor; every method
    that matters is replaced, and the base class never starts a thread.)
    """

    def __init__(self, workers_per_plugin: int = 4, core_workers: int = 8):
        super().__init__(max_workers=1)
        self.workers_per_plugin = workers_per_plugin
        # Short-lived idle core threads: the core's own work is brief (name resolution for
        # the HTTP client, closing the store), and a stopped app leaves no thread for long.
        self.core = ThreadPool("core", core_workers, idle=2.0)
        self.pools: dict[str, ThreadPool] = {}
        self._pools_lock = threading.Lock()
        self._stopped = False

    def pool(self, plugin: str | None) -> ThreadPool:
        """The pool of ``plugin`` (None: the core's)."""
        if plugin is None:
            return self.core
        with self._pools_lock:
            pool = self.pools.get(plugin)
            if pool is None:
                if self._stopped:
                    raise RuntimeError(f"plugin {plugin}: no new threads after shutdown")
                pool = ThreadPool(f"plugin-{plugin}", self.workers_per_plugin)
                self.pools[plugin] = pool
            return pool

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        return self.pool(current_plugin.get()).submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the plugins' pools without waiting for hung threads (``wait`` is ignored).

        The core pool keeps serving: other applications on the same loop (tests) and the
        last database work of a stopping one still need threads.
        """
        with self._pools_lock:
            self._stopped = True
            pools = list(self.pools.values())
        for pool in pools:
            pool.shutdown()

    def busy(self) -> dict[str, int]:
        """Busy threads per plugin pool."""
        return {name: pool.busy for name, pool in self.pools.items()}


def exit_guard(budget: float) -> threading.Thread:
    """End the process ``budget`` seconds after a stop began, if it is still alive then.

    For the ``serve`` command only: whatever a plugin does (a thread that never returns, a
    coroutine that ignores cancellation, a call that blocks the loop), the process exits.
    """

    def watch() -> None:
        stop_requested.wait()
        time.sleep(budget)
        log.error(
            "shutdown exceeded %.1f s (a plugin is stuck; %s): exiting now",
            budget,
            running_hook.describe(),
        )
        logging.shutdown()
        os._exit(1)

    thread = threading.Thread(target=watch, name="exit-guard", daemon=True)
    thread.start()
    return thread


def watch_signals(
    signals: tuple[int, ...], deliver: Callable[[int], None], stopping: frozenset[int]
) -> threading.Thread:
    """Receive ``signals`` in a thread of their own, so they win over a blocked loop.

    The C-level handler writes each signal's number to a wakeup socket whatever the main
    thread is doing; this thread reads it, sets :data:`stop_requested` for a signal in
    ``stopping`` (which arms :func:`exit_guard`) and calls ``deliver`` (which should hand
    the number to the loop with ``call_soon_threadsafe``). For the ``serve`` command only:
    it replaces the process's handlers of ``signals``.
    """
    reader, writer = socket.socketpair()
    reader.setblocking(True)
    writer.setblocking(False)
    for sig in signals:
        signal.signal(sig, lambda _signum, _frame: None)  # the wakeup fd does the work
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

    def watch() -> None:
        while True:
            data = reader.recv(64)
            if not data:
                return
            for signum in data:
                if signum not in signals:
                    continue
                if signum in stopping:
                    if stop_requested.is_set():
                        log.warning("received %s again while stopping", signal.Signals(signum).name)
                    stop_requested.set()
                    if running_hook.plugin is not None:
                        log.warning("received %s while %s", signal.Signals(signum).name,
                                    running_hook.describe())  # fmt: skip
                try:
                    deliver(signum)
                except RuntimeError:  # the loop has closed: the process is ending anyway
                    return

    thread = threading.Thread(target=watch, name="signal-watch", daemon=True)
    thread._quotaserver_sockets = (reader, writer)  # type: ignore[attr-defined]  # keep alive
    thread.start()
    return thread


class LoopWatchdog:
    """Notice an event loop blocked longer than ``threshold`` seconds, and by whom.

    The loop beats every ``threshold / 5`` seconds; a thread checks the beat. A block is
    logged at once from the thread (naming :data:`running_hook`) and reported once per
    block to ``on_block(plugin, hook, seconds)``, called on the loop when it is free again
    (``plugin`` None: core code, or a plugin's code the host does not call).
    """

    def __init__(
        self,
        on_block: Callable[[str | None, str | None, float], None],
        threshold: float = 0.5,
    ):
        self.on_block = on_block
        self.threshold = threshold
        self.blocks = 0
        self._beat = time.monotonic()
        self._stopped = threading.Event()
        self._loop: Any = None
        self._timer: Any = None

    def start(self, loop: Any) -> None:
        self._loop = loop
        self._tick()
        threading.Thread(target=self._watch, name="loop-watchdog", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        if self._timer is not None:
            self._timer.cancel()

    def _tick(self) -> None:
        self._beat = time.monotonic()
        if not self._stopped.is_set():
            self._timer = self._loop.call_later(self.threshold / 5, self._tick)

    def _watch(self) -> None:
        reported = None  # the beat of the block already reported
        while not self._stopped.wait(self.threshold / 5):
            beat = self._beat
            blocked = time.monotonic() - beat
            if blocked <= self.threshold or reported == beat:
                continue
            reported = beat
            plugin, hook = running_hook.plugin, running_hook.hook
            self.blocks += 1
            if plugin is None:
                log.warning("the event loop is blocked (%.1f s so far) by core code", blocked)
            else:
                log.error(
                    "plugin %s blocks the event loop in %s (%.1f s so far)", plugin, hook, blocked
                )
            try:
                self._loop.call_soon_threadsafe(self.on_block, plugin, hook, blocked)
            except RuntimeError:  # the loop closed
                return
