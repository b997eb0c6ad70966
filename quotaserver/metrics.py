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
import math
import os
import re
from dataclasses import dataclass, field
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
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    import tornado.web

    from .app import QuotaApp
    from .quota import Decision
    from .realtime.messages import Message

__all__ = [
    "CONTENT_TYPE_LATEST",
    "MetricSample",
    "Metrics",
    "enable_multiprocess",
    "worker_exited",
]

log = logging.getLogger(__name__)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DECISION_RESULTS = ("allowed", "denied", "overloaded")
TRANSPORTS = ("websocket", "sse")
# Consume latency buckets (s): a consume takes about a millisecond on SQLite when idle,
# tens of milliseconds under load; past a second something is wrong.
CONSUME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


_METRIC_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_LABEL_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")


@dataclass(frozen=True)
class MetricSample:
    """One value a plugin adds to ``GET /metrics`` (the ``metric_samples`` hook).

    ``kind`` is ``gauge`` or ``counter`` (a counter's name is exposed with ``_total``);
    samples of one name must share ``kind``, ``help`` and label names.
    """

    name: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)
    help: str = ""
    kind: str = "gauge"


def sample_problem(plugin: str, sample: Any) -> str | None:
    """Why the host refuses ``sample`` from ``plugin``, or None."""
    if not isinstance(sample, MetricSample):
        return f"{sample!r} is not a MetricSample"
    prefix = f"quotaserver_{plugin.replace('-', '_')}_"
    if not sample.name.startswith(prefix) or not _METRIC_NAME.match(sample.name):
        return f"metric {sample.name!r}: must match {prefix}[a-z0-9_]+"
    if sample.kind not in ("gauge", "counter"):
        return f"metric {sample.name!r}: kind must be gauge or counter"
    if not isinstance(sample.value, int | float) or not math.isfinite(sample.value):
        return f"metric {sample.name!r}: value must be a finite number"
    if not all(isinstance(k, str) and _LABEL_NAME.match(k) for k in sample.labels):
        return f"metric {sample.name!r}: label names must match {_LABEL_NAME.pattern}"
    return None


class _PluginCollector:
    """The plugins' samples, gathered on the loop (refresh) and exposed at scrape time."""

    def __init__(self) -> None:
        self.samples: list[MetricSample] = []

    def describe(self) -> list:
        return []

    def collect(self) -> list:
        families: dict[str, Any] = {}
        for s in self.samples:
            family = families.get(s.name)
            if family is None:
                kind = CounterMetricFamily if s.kind == "counter" else GaugeMetricFamily
                family = families[s.name] = kind(s.name, s.help, labels=sorted(s.labels))
            family.add_metric([str(s.labels[k]) for k in sorted(s.labels)], s.value)
        return list(families.values())


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
        # Per process, also with several workers: plugins keep their figures in memory.
        self.plugin_samples = _PluginCollector()
        self.registry.register(self.plugin_samples)
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
        self._slow_closed_seen = 0

    # -- updates from the application ----------------------------------------------------
    def decided(self, decision: Decision) -> None:
        """Count one consume decision."""
        if decision.allowed:
            result = "allowed"
        elif decision.reason == "system_overloaded":
            result = "overloaded"
        else:
            result = "denied"
        self._decided[result].inc()

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
        self.plugin_samples.samples = self._plugin_samples()
        if self.multiprocess:
            future = asyncio.get_running_loop().run_in_executor(None, self._sample_process)
            future.add_done_callback(_log_failure)

    def _plugin_samples(self) -> list[MetricSample]:
        samples: list[MetricSample] = []
        shapes: dict[str, tuple[str, str, tuple[str, ...]]] = {}
        for plugin, result in self.app.hooks.call("metric_samples", app=self.app):
            for sample in result:
                problem = sample_problem(plugin, sample)
                if problem is None:
                    shape = (sample.kind, sample.help, tuple(sorted(sample.labels)))
                    if shapes.setdefault(sample.name, shape) != shape:
                        problem = f"metric {sample.name!r}: samples differ in kind, help or labels"
                if problem is not None:
                    self.app.hooks.refuse(plugin, "metric_samples", ValueError(problem))
                    break  # the rest of this plugin's samples this time
                samples.append(sample)
        return samples

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
