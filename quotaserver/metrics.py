"""Prometheus metrics, produced by ``prometheus-client`` and served at ``GET /metrics``.

One :class:`Metrics` per application. Counters and the histogram are updated where things
happen (a decision, a published event, a database error); gauges that mirror live state
(stream clients, source health, the throttle factor) are refreshed from the hub and the
scheduler on a timer and just before each scrape.

**Several worker processes.** Each worker is its own process with its own hub, so a scrape
that reaches one worker must still report all of them. prometheus-client's multiprocess
mode does that: every worker writes its values to memory-mapped files in one directory and
the scrape merges them (counters and the histogram summed over workers, gauges reported per
worker with a ``pid`` label). The launcher calls :func:`enable_multiprocess` once, before
forking; each worker then builds its app as usual, and calls :func:`worker_exited` with the
pid of a worker that died so its live gauges stop being reported. With a single process
nothing of this is needed: values live in memory and ``process_*`` describes that process.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import os
from typing import TYPE_CHECKING, Any

import psutil
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
    multiprocess,
    values,
)

if TYPE_CHECKING:
    import tornado.web

    from .app import QuotaApp
    from .quota import Decision
    from .realtime.messages import Message

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "enable_multiprocess", "worker_exited"]

log = logging.getLogger(__name__)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DECISION_RESULTS = ("allowed", "denied", "overloaded")
TRANSPORTS = ("websocket", "sse")
THROTTLE_RESOURCES = ("cpu", "memory")
# Consume latency buckets (s): a consume takes about a millisecond on SQLite when idle,
# tens of milliseconds under load; past a second something is wrong.
CONSUME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


def enable_multiprocess(directory: str) -> None:
    """Switch this process (and the workers it forks) to multiprocess metrics.

    Call once in the parent before forking workers and before any app is built. Files
    left in ``directory`` by a previous run are removed: they would add old counts.
    """
    os.makedirs(directory, exist_ok=True)
    for path in glob.glob(os.path.join(directory, "*.db")):
        os.remove(path)
    os.environ[MULTIPROC_ENV] = directory
    # prometheus-client picks its value storage when it is imported; choose again now
    # that the directory is set, so metrics created from here on are file-backed.
    values.ValueClass = values.get_value_class()


def worker_exited(pid: int) -> None:
    """Forget the live gauges of worker ``pid`` (call from the launcher when it exits)."""
    multiprocess.mark_process_dead(pid)


class _FileCollector(multiprocess.MultiProcessCollector):
    """The workers' metric files, read at scrape time only.

    Without ``describe`` the registry collects once at registration to learn the names,
    reading files other workers may be creating at that moment (a start-up traceback).
    """

    def describe(self) -> list:
        return []


class Metrics:
    """Every quotaserver metric, bound to one application."""

    def __init__(self, app: QuotaApp):
        self.app = app
        self.multiprocess = multiprocess_enabled()
        if self.multiprocess and values.ValueClass._multiprocess is False:
            values.ValueClass = values.get_value_class()
        # A registry per application: tests run many apps in one process, and the global
        # default registry would refuse the second set of names.
        self.registry = CollectorRegistry(auto_describe=True)
        if self.multiprocess:
            _FileCollector(self.registry)
            own = None  # values are collected from the files, not from these objects
        else:
            own = self.registry
        ProcessCollector(registry=self.registry)
        gauge_mode = {"multiprocess_mode": "liveall"}  # one series per live worker
        self.decisions = Counter(
            "quotaserver_decisions",
            "Consume decisions by result.",
            ["result"],
            registry=own,
        )
        self.consume_seconds = Histogram(
            "quotaserver_consume_seconds",
            "Time to answer POST /api/quotas/consume (allowed, denied or overloaded).",
            buckets=CONSUME_BUCKETS,
            registry=own,
        )
        self.stream_clients = Gauge(
            "quotaserver_stream_clients",
            "Live stream clients by transport.",
            ["transport"],
            registry=own,
            **gauge_mode,
        )
        self.events_published = Counter(
            "quotaserver_events_published",
            "Durable events published to clients, by type.",
            ["type"],
            registry=own,
        )
        self.slow_consumer_closes = Counter(
            "quotaserver_slow_consumer_closes",
            "Stream clients closed because they could not keep up (close code 4008).",
            registry=own,
        )
        self.source_up = Gauge(
            "quotaserver_source_up",
            "1 if the data source's last run succeeded, else 0.",
            ["source"],
            registry=own,
            **gauge_mode,
        )
        self.db_errors = Counter(
            "quotaserver_db_errors",
            "Database operations that failed, by kind.",
            ["kind"],
            registry=own,
        )
        self.throttle_refusals = Counter(
            "quotaserver_throttle_refusals",
            "Consumes refused with 503 system_overloaded (throttle factor 0), by the load "
            "whose band reached 0.",
            ["resource"],
            registry=own,
        )
        self.throttle_factor = Gauge(
            "quotaserver_throttle_factor",
            "Current throttle factor (1 = no throttling, 0 = consumes refused).",
            registry=own,
            **gauge_mode,
        )
        # process_* describes only the process that answers a scrape: with several
        # workers, each also reports its own figures here, by pid.
        self.worker_memory = self.worker_cpu = self.worker_fds = None
        if self.multiprocess:
            self.worker_memory = Gauge(
                "quotaserver_worker_resident_memory_bytes",
                "Resident memory of each worker process.",
                registry=None,
                **gauge_mode,
            )
            self.worker_cpu = Gauge(
                "quotaserver_worker_cpu_seconds",
                "CPU time (user + system) used by each worker process.",
                registry=None,
                **gauge_mode,
            )
            self.worker_fds = Gauge(
                "quotaserver_worker_open_fds",
                "Open file descriptors of each worker process.",
                registry=None,
                **gauge_mode,
            )
            self._process = psutil.Process()
        self._decided: dict[str, Any] = {}
        for result in DECISION_RESULTS:
            self._decided[result] = self.decisions.labels(result)  # labels() per call: ~5 us
        for transport in TRANSPORTS:
            self.stream_clients.labels(transport)
        for resource in THROTTLE_RESOURCES:
            self.throttle_refusals.labels(resource)  # present at 0 from the first scrape
        self._slow_closed_seen = 0

    # -- updates from the application ----------------------------------------------------
    def decided(self, decision: Decision) -> None:
        """Count one consume decision."""
        if decision.allowed:
            result = "allowed"
        elif decision.reason == "system_overloaded":
            result = "overloaded"
            self.throttle_refused()
        else:
            result = "denied"
        self._decided[result].inc()

    def throttle_refused(self) -> None:
        """Count one consume refused because the throttle factor is 0."""
        resource = self.app.load.refusing
        if resource in THROTTLE_RESOURCES:
            self.throttle_refusals.labels(resource).inc()

    def published(self, message: Message) -> None:
        """Count one durable event handed to the hub."""
        if message.seq is not None:
            self.events_published.labels(message.type).inc()

    def db_error(self, kind: str) -> None:
        """Count one failed database operation (``unavailable``, ``busy``, ``timeout``...)."""
        self.db_errors.labels(kind).inc()

    def request_finished(self, handler: tornado.web.RequestHandler) -> None:
        """Observe the duration of a consume request that was decided."""
        if getattr(handler, "consume", False) and handler.get_status() in (200, 429, 503):
            self.consume_seconds.observe(handler.request.request_time())

    def refresh(self) -> None:
        """Copy live state (hub, scheduler, throttle) into the gauges. Runs on the loop."""
        app = self.app
        for transport in TRANSPORTS:
            self.stream_clients.labels(transport).set(app.hub.count(transport))
        closed = app.hub.slow_closed
        if closed > self._slow_closed_seen:
            self.slow_consumer_closes.inc(closed - self._slow_closed_seen)
        self._slow_closed_seen = closed
        for name, health in app.scheduler.sources.items():
            self.source_up.labels(name).set(1 if health.healthy else 0)
        self.throttle_factor.set(app.load.factor)
        if self.multiprocess:
            future = asyncio.get_running_loop().run_in_executor(None, self._sample_process)
            future.add_done_callback(_log_failure)

    def _sample_process(self) -> None:
        """This worker's process figures (psutil reads /proc: off the loop)."""
        process = self._process
        with process.oneshot():
            cpu = process.cpu_times()
            self.worker_memory.set(process.memory_info().rss)
            self.worker_cpu.set(cpu.user + cpu.system)
            self.worker_fds.set(process.num_fds())

    # -- exposition ----------------------------------------------------------------------
    async def exposition(self) -> bytes:
        """The text format, with gauges fresh; file merging and /proc reads off the loop."""
        self.refresh()
        loop = asyncio.get_running_loop()
        if self.multiprocess:
            await loop.run_in_executor(None, self._sample_process)
        return await loop.run_in_executor(None, generate_latest, self.registry)


def _log_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("sampling this worker's process figures failed: %s", future.exception())
