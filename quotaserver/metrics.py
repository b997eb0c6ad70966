"""Prometheus metrics, produced by ``prometheus-client`` and served at ``GET /metrics``.

One :class:`Metrics` per application. Counters and the histogram are updated where things
happen (a decision, a published event, a database error); gauges that mirror live state
(stream clients, source health, the throttle factor) are refreshed from the hub and the
scheduler on a timer and just before each scrape.

**Several worker processes.** Each worker is its own process with its own hub, so a scrape
that reaches one worker must still report all of them. prometheus-client's multiprocess
mode does that: every worker writes its values to memory-mapped files in one directory and
the scrape merges them (counters and the histogram summed over workers, gauges combined
over the live workers: clients summed, health and the throttle factor at their worst). The
launcher calls :func:`enable_multiprocess` once, after its own start-up work and before
forking (so it writes no series of its own); each worker then builds its app as usual, and
the launcher calls :func:`worker_exited` with the pid of a worker that died so its live
gauges stop being reported, and :func:`disable_multiprocess` at the end. With a single
process values live in memory.

**The same series for 1 and N workers.** Every name has the same labels either way: the
combined gauges carry no ``pid``, and the per-process ``quotaserver_worker_*`` gauges carry
``pid`` in both modes (one series with one process).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import math
import os
import platform
import re
import shutil
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
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from . import __version__

if TYPE_CHECKING:
    import tornado.web

    from .app import QuotaApp
    from .quota import Decision
    from .realtime.messages import Message

__all__ = [
    "CONTENT_TYPE_LATEST",
    "MetricSample",
    "Metrics",
    "disable_multiprocess",
    "enable_multiprocess",
    "worker_exited",
]

log = logging.getLogger(__name__)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DECISION_RESULTS = ("allowed", "denied", "overloaded")
TRANSPORTS = ("websocket", "sse")
THROTTLE_RESOURCES = ("cpu", "memory")
BACKPLANE_OUTCOMES = ("received", "dropped", "rejected")
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


def disable_multiprocess(directory: str, remove: bool) -> None:
    """The launcher's stop: delete the workers' files (the whole ``directory`` when the
    launcher made it), so no run leaves ``quotaserver-metrics-*`` behind."""
    if remove:
        shutil.rmtree(directory, ignore_errors=True)
    else:
        for path in glob.glob(os.path.join(directory, "*.db")):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


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
        if self.multiprocess != values.ValueClass._multiprocess:
            # prometheus-client chose its value storage at import; follow the environment
            # now (the launcher builds an in-memory app before it turns multiprocess on).
            values.ValueClass = values.get_value_class()
        # A registry per application: tests run many apps in one process, and the global
        # default registry would refuse the second set of names.
        self.registry = CollectorRegistry(auto_describe=True)
        # Counters' *_created samples exist only without workers: the series would differ
        # between 1 and N workers (and Prometheus does not need them).
        disable_created_metrics()
        if self.multiprocess:
            _FileCollector(self.registry)
            own = None  # values are collected from the files, not from these objects
        else:
            own = self.registry
        ProcessCollector(registry=self.registry)
        # Per process, also with several workers: plugins keep their figures in memory.
        self.plugin_samples = _PluginCollector()
        self.registry.register(self.plugin_samples)
        # Gauges over the live workers, without a pid (so the labels match one process):
        # clients add up; health, connection and throttle figures report the worst worker.
        total = {"multiprocess_mode": "livesum"}
        worst = {"multiprocess_mode": "livemin"}
        highest = {"multiprocess_mode": "livemax"}
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
            **total,
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
            "1 if the data source's last run succeeded (on every worker), else 0.",
            ["source"],
            registry=own,
            **worst,
        )
        self.db_errors = Counter(
            "quotaserver_db_errors",
            "Database operations that failed, by kind.",
            ["kind"],
            registry=own,
        )
        self.loop_blocks = Counter(
            "quotaserver_loop_blocks",
            "Times the event loop was blocked over 0.5 s, by the plugin running (core: none).",
            ["plugin"],
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
            "Current throttle factor (1 = no throttling, 0 = consumes refused); the lowest "
            "of the workers'.",
            registry=own,
            **worst,
        )
        self.build_info = Gauge(
            "quotaserver_build_info",
            "Always 1; the labels say which quotaserver and Python answer.",
            ["version", "python"],
            registry=own,
            **highest,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)
        self.http_requests = Counter(
            "quotaserver_http_requests",
            "HTTP requests answered, by route template and status (WebSocket and SSE "
            "handshakes included, counted when they end).",
            ["route", "status"],
            registry=own,
        )
        self._http: dict[tuple[type, int], Any] = {}
        #: handler class -> route template; the app fills it from its route table
        self.route_names: dict[type, str] = {}
        self.backplane_connected = Gauge(
            "quotaserver_backplane_connected",
            "1 while the backplane (Redis) is connected (on every worker), else 0; always 1 "
            "without one.",
            registry=own,
            **worst,
        )
        self.backplane_lag = Gauge(
            "quotaserver_backplane_lag_seconds",
            "Seconds from commit to arrival of the last event from another instance (the "
            "highest of the workers'); NaN before the first.",
            registry=own,
            **highest,
        )
        self.backplane_messages = Counter(
            "quotaserver_backplane_messages",
            "Backplane messages by outcome: received from other instances, dropped (not "
            "sent or not decodable: receivers backfill from the database), rejected (failed "
            "authentication).",
            ["outcome"],
            registry=own,
        )
        self._backplane_seen = dict.fromkeys(BACKPLANE_OUTCOMES, 0)
        # process_* describes only the process that answers a scrape: each worker also
        # reports its own figures here, by pid (one series when there is one process).
        self.worker_memory = self._per_process(
            "quotaserver_worker_resident_memory_bytes", "Resident memory of each worker process."
        )
        self.worker_cpu = self._per_process(
            "quotaserver_worker_cpu_seconds", "CPU time (user + system) used by each worker."
        )
        self.worker_fds = self._per_process(
            "quotaserver_worker_open_fds", "Open file descriptors of each worker process."
        )
        self._process = psutil.Process()
        self._decided: dict[str, Any] = {}
        for result in DECISION_RESULTS:
            self._decided[result] = self.decisions.labels(result)  # labels() per call: ~5 us
        for transport in TRANSPORTS:
            self.stream_clients.labels(transport)
        for resource in THROTTLE_RESOURCES:
            self.throttle_refusals.labels(resource)  # present at 0 from the first scrape
        for outcome in BACKPLANE_OUTCOMES:
            self.backplane_messages.labels(outcome)
        self._slow_closed_seen = 0

    def _per_process(self, name: str, documentation: str) -> Any:
        """A gauge with a ``pid`` label in both modes (the file collector adds it itself)."""
        if self.multiprocess:
            return Gauge(name, documentation, registry=None, multiprocess_mode="liveall")
        gauge = Gauge(name, documentation, ["pid"], registry=self.registry)
        return gauge.labels(str(os.getpid()))

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
        """Count a finished request by route and status; time a consume that was decided."""
        status = handler.get_status()
        key = (type(handler), status)
        child = self._http.get(key)
        if child is None:  # bounded: route templates x statuses; labels() once each
            route = self.route_names.get(type(handler), "other")
            child = self._http[key] = self.http_requests.labels(route, str(status))
        child.inc()
        if getattr(handler, "consume", False) and status in (200, 429, 503):
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
        backplane = app.backplane
        self.backplane_connected.set(1 if backplane.connected else 0)
        self.backplane_lag.set(float("nan") if backplane.lag is None else backplane.lag)
        for outcome in BACKPLANE_OUTCOMES:
            # ``rejected`` comes with message authentication; 0 where it is not counted.
            now = getattr(backplane, outcome, 0)
            if now > self._backplane_seen[outcome]:
                self.backplane_messages.labels(outcome).inc(now - self._backplane_seen[outcome])
            self._backplane_seen[outcome] = now
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
        await loop.run_in_executor(None, self._sample_process)
        return await loop.run_in_executor(None, generate_latest, self.registry)


def _log_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("sampling this worker's process figures failed: %s", future.exception())
