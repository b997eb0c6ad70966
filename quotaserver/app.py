"""QuotaApp: owns the database, services, broadcaster and plugins; ``start`` and ``stop``."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pluggy
import tornado.httpserver
import tornado.netutil
import tornado.web
from tornado.ioloop import PeriodicCallback

from . import retention
from .alerts import AlertService
from .auth import Auth
from .change import Change, commit
from .config import Config
from .db import Store
from .defaults_policy import reconcile as reconcile_defaults
from .events import events_after, events_since, last_seq
from .handlers.base import MisdirectedHandler, StaticHandler
from .isolation import LoopWatchdog, PluginThreads, current_plugin
from .load_log import LoadLog
from .logs import log_request
from .metrics import Metrics
from .netguard import make_http_server
from .origins import HostGuard
from .plugin_storage import PluginStorage
from .plugins import Hooks, PluginEventError, get_plugin_manager
from .probes import DatabaseProbe
from .quota import Decision, QuotaService
from .read_gate import ReadGate
from .realtime.backplane import RedisBackplane, make_backplane
from .realtime.cluster_counts import ClusterCounts
from .realtime.emitters import Scheduler
from .realtime.hub import Hub
from .realtime.limits import ConnectionLimiter
from .realtime.messages import CLOSE_GOING_AWAY, CLOSE_POLICY, CONTROL_TYPES, CORE_TYPES, Message
from .refunds import RefundService
from .rules import RuleService
from .secret_files import private_database_files, read_or_create_secret
from .throttle import SystemLoad
from .tokens import Identity
from .urls import route_templates, routes
from .windows import Clock, utc_now

log = logging.getLogger(__name__)
ROOT = os.path.dirname(os.path.abspath(__file__))  # templates/ and static/: package data


class QuotaApp:
    """The application. Plugins get it as ``app`` and use its public attributes:

    ``config``, ``clock``, ``store`` (``await app.store.run(fn)``), ``quota``
    (QuotaService), ``rules`` (RuleService), ``refunds`` (RefundService), ``alerts``
    (AlertService), ``load`` (SystemLoad), ``hub``, ``publish_event``, ``read_events``,
    ``last_seq``, ``plugin_config``, ``plugin_state``, ``plugin_storage`` (PluginStorage).
    """

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock = utc_now,
        plugin_manager: pluggy.PluginManager | None = None,
        env: dict[str, str] | None = None,
    ):
        self.config = config
        self.clock = clock
        # Plugins load first: one that cannot load stops start-up (exit 2) before the
        # database file or directory is created.
        self.pm = plugin_manager or get_plugin_manager(config)
        self.hooks = Hooks(
            self.pm,
            timeout=config["plugin_timeout"],
            max_payload=config["plugin_max_payload_bytes"],
        )
        private_database_files(config["database.url"])
        self.store = Store.from_config(config)
        self.load = SystemLoad.from_config(config)
        self.load_log = LoadLog(self.store, self.load.history, lambda: self.instance_name)
        self.read_gate = ReadGate()  # admin page reads take turns (quotaserver.read_gate)
        self.hub = Hub(
            self._replay,
            max_connections=config["realtime.max_connections"],
            client_queue=config["realtime.client_queue"],
            client_queue_bytes=config["realtime.client_queue_bytes"],
            replay_limit=config["realtime.replay_limit"],
            ring_size=config["realtime.ring_size"],
            intervals={
                "stats": config["realtime.stats_interval"],
                "heartbeat": config["realtime.heartbeat_interval"],
                "client_timeout": config["realtime.client_timeout"],
            },
        )
        self.backplane = make_backplane(
            config["backplane.url"], config["backplane.channel"], config["backplane.secret"]
        )
        # Plugin threads: a bounded pool per plugin, installed as the loop's default
        # executor at start so even asyncio.to_thread in a plugin cannot starve the others.
        self.threads = PluginThreads()
        self.hooks.threads = self.threads  # plain third-party hooks run in their pools
        self.quota = QuotaService(
            config,
            self.store,
            self.load,
            clock,
            publish=self.publish,
            on_decision=self._decided,
            on_decisions=self._decided_many,
        )
        self.alerts = AlertService(self.store, self.publish, clock)
        self.plugin_storage = PluginStorage(self.store, clock)
        self.rules = RuleService(self.quota, self.publish)
        self.refunds = RefundService(self.quota, self.publish)
        self.scheduler = Scheduler(
            self.publish_event,
            declare=self.hooks.declare_event_types,
            emit_timeout=config["plugin_timeout"],
        )
        self.auth = Auth(config, env)
        self.limiter = ConnectionLimiter.from_config(config)
        # With Redis, the limits that protect the cluster count the cluster.
        self.cluster_counts: ClusterCounts | None = None
        if isinstance(self.backplane, RedisBackplane):
            backplane = self.backplane
            self.cluster_counts = ClusterCounts(
                backplane.client, backplane.channel, backplane.origin
            )
            self.auth.failures.share = self.cluster_counts.count_failure
            self.auth.failures.on_block = lambda address, seconds: backplane.publish_control(
                {"blocked": address, "seconds": seconds}
            )
        self.metrics = Metrics(self)
        self.watchdog = LoopWatchdog(self._loop_blocked)
        # database_busy -> "busy", database_unavailable -> "unavailable"
        self.store.on_error = lambda exc: self.metrics.db_error(exc.code.removeprefix("database_"))
        self.web = tornado.web.Application(routes(self), **self._settings())
        self.metrics.route_names = route_templates(self)
        self.server: tornado.httpserver.HTTPServer | None = None
        self.port: int | None = None
        self.running = False
        self.stopped = False
        self._timers: list[PeriodicCallback] = []
        self._tasks: set[asyncio.Future] = set()
        self._plugin_state: dict[str, dict[str, Any]] = {}
        self._sync_ticks = 0
        #: The health routes' view of the database (quotaserver.probes): never a wait.
        self.probe = DatabaseProbe(self.store, self.track)
        #: Apply quotas.defaults_policy at start; a worker leaves it to its launcher.
        self.owns_defaults = True

    def _settings(self) -> dict[str, Any]:
        cfg = self.config
        secret = cfg["auth.cookie_secret"]
        if not secret:
            data_dir = os.path.dirname(cfg["auth.token_file"]) or "."
            path = os.path.join(data_dir, "cookie_secret")
            secret, _ = read_or_create_secret(path, 32, "auth.cookie_secret")
        return {
            "cookie_secret": secret,
            "template_path": os.path.join(ROOT, "templates"),
            "static_path": os.path.join(ROOT, "static"),
            "static_handler_class": StaticHandler,
            # Protocol pings three times per timeout; Hub.reap drops a peer whose pongs
            # stop (Tornado's own ping timeout would wait 5 s more for a close handshake).
            "websocket_ping_interval": cfg["realtime.client_timeout"] / 3,
            "websocket_ping_timeout": 0,
            "websocket_max_message_size": 64 * 1024,
            "xsrf_cookie_kwargs": {"samesite": "Strict"},
            "compress_response": False,
            "log_function": self._request_finished,
        }

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self, listen: bool = True, sockets: list[socket.socket] | None = None) -> None:
        """Migrate, load state, start plugins, emitters and timers, then listen (on
        ``sockets`` when given: the workers of one port share the parent's). A start that
        fails stops what it started (threads, connections) before the error propagates."""
        try:
            await self._start(listen, sockets)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, listen: bool, sockets: list[socket.socket] | None) -> None:
        asyncio.get_running_loop().set_default_executor(self.threads)
        # Migrations and seeding under one lock: instances started together take turns.
        await self.store.run(self.store.migrate, self.quota.seed_defaults)
        await self.auth.load(self.store, self.clock)
        self.auth.on_reload = self.end_revoked
        self.auth.on_change = lambda: self.backplane.publish_control({"credentials": True})
        self.hub.last_seq = await self.store.run(last_seq)
        await self.backplane.start(
            self._remote_event, self._resync, self._remote_live, self._control
        )
        assert self.auth.sync is not None
        self.auth.sync.start()
        if self.cluster_counts is not None:
            self.cluster_counts.start(lambda: self.hub.per_identity)
        self.watchdog.start(asyncio.get_running_loop())
        await self.hooks.call_async("startup", app=self)
        self.register_sources()
        # Every type a plugin declared (hook or emitters): the welcome lists them, so a client
        # (an EventSource needs a listener per named event) knows what may arrive.
        self.hub.plugin_types = tuple(sorted(self.hooks.event_types))
        await self.scheduler.start(timeout=self.config["plugin_timeout"])
        if self.owns_defaults:  # after the plugins started: they see its quota_change events
            await reconcile_defaults(self.quota, self.config, self.publish)
        cfg = self.config
        self._timers = [
            PeriodicCallback(self.broadcast_stats, cfg["realtime.stats_interval"] * 1000),
            PeriodicCallback(self.hub.ping, cfg["realtime.heartbeat_interval"] * 1000),
            PeriodicCallback(self._sync_tick, 1000),
            PeriodicCallback(self._probe_database, cfg["realtime.stats_interval"] * 1000),
            PeriodicCallback(self.metrics.refresh, 1000),
            # Often enough that a silent peer goes at client_timeout, not up to a third
            # later (30-40 s, 39 s seen, with a reaper every timeout / 3): at most 1 s late.
            PeriodicCallback(
                lambda: self.hub.reap(cfg["realtime.client_timeout"]),
                reap_interval(cfg["realtime.client_timeout"]) * 1000,
            ),
        ]
        for timer in self._timers:
            timer.start()
        self.load_log.start()
        self.broadcast_stats()
        self.running = True
        if listen:
            if sockets is None:
                sockets = tornado.netutil.bind_sockets(
                    cfg["server.port"], cfg["server.host"], family=socket.AF_INET
                )
            # Every request passes the Host check before any handler (quotaserver.origins).
            guarded = HostGuard(self.web, self.auth.hosts, MisdirectedHandler, {"app": self})
            # Bodies up to 4x the cap are read and refused by the handler with a JSON
            # 413; beyond that Tornado refuses from Content-Length alone (400, closed).
            self.server = make_http_server(guarded, cfg, cfg["server.max_body_size"] * 4)
            self.server.add_sockets(sockets)
            self.port = sockets[0].getsockname()[1]
        self.hub.instance = self.instance_name
        self.hub.sync_on_recover = self.clustered

    def register_sources(self) -> None:
        """The data sources: retention, every plugin's emitters and stats fields. Two of
        them claiming one name is a :class:`PluginError` that stops start-up; check-config
        (:func:`quotaserver.plugins.check_setup`) runs this same step on a throw-away app."""
        self.scheduler.add(retention.emitter(self), "quotaserver")
        for plugin, emitters in self.hooks.call("register_emitters", app=self):
            for emitter in emitters:
                self.scheduler.add(self.hooks.isolated(emitter, plugin), plugin)
        self.hooks.stats(self, self._stats_claims(), strict=True)

    def _loop_blocked(self, plugin: str | None, hook: str | None, seconds: float) -> None:
        self.hooks.loop_blocked(plugin, hook, seconds)
        self.metrics.loop_blocks.labels(plugin or "core").inc()

    async def stop(
        self, code: int = CLOSE_GOING_AWAY, reason: str = "server shutting down"
    ) -> None:
        """Stop accepting, close clients with ``code``, stop emitters, finish DB writes."""
        if self.stopped:
            return
        self.stopped = True
        self.watchdog.stop()
        if self.server is not None:
            self.server.stop()
        self.running = False
        for timer in self._timers:
            timer.stop()
        self.hub.close_all(code, reason)
        # Budget (server.shutdown_timeout, 10 s by default): 3 s for emitters, 2 s for
        # plugin reactions in flight, 2 s for shutdown hooks, 1 s for connections; then the
        # queued database writes finish, whatever they take.
        await self.scheduler.stop(timeout=3)
        if self.auth.sync is not None:
            await self.auth.sync.stop()
        if self.cluster_counts is not None:
            await self.cluster_counts.stop()
        await self.backplane.stop()
        await self.hub.sequencer.stop()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
            for task in list(self._tasks):  # plugin reactions still hanging: abandoned
                task.cancel()
        await self.hooks.call_async("shutdown", timeout=2, app=self)
        await self.quota.flush_activity(closing=True)
        await self.load_log.close()
        self.threads.shutdown(wait=False)
        if self.server is not None:
            try:
                async with asyncio.timeout(1):
                    await self.server.close_all_connections()
            except TimeoutError:
                log.warning("some connections did not close in time")
        # A thread of its own (the pools are shut): none is left behind once closed.
        with ThreadPoolExecutor(1, thread_name_prefix="db-close") as closer:
            await asyncio.get_running_loop().run_in_executor(closer, self.store.close)

    @property
    def clustered(self) -> bool:
        """True when other instances may share the database (a backplane is configured)."""
        return self.backplane.kind != "local"

    @property
    def instance_name(self) -> str:
        """``server.instance_name``, or ``hostname:port``."""
        return self.config["server.instance_name"] or f"{socket.gethostname()}:{self.port}"

    @property
    def url(self) -> str:
        host = self.config["server.host"]
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        return f"http://{host}:{self.port}"

    # -- publishing --------------------------------------------------------------------
    def publish(self, messages: list[Message]) -> None:
        """Fan committed events out to clients, then tell plugins (never blocks)."""
        for message in messages:
            self.hub.publish(message)
            if message.seq is not None:
                self.backplane.publish(message)
            self.metrics.published(message)
        for message in messages:
            self.react("on_event", message=message)
            if message.type == "violation":
                self.react("on_violation", violation=message.data)

    async def publish_event(
        self, type: str, data: dict[str, Any], durable: bool = True, *, plugin: str | None = None
    ) -> Message:
        """Persist a durable event, then publish it (``durable=False``: publish only).

        The ``emit`` of event emitters. Called by a plugin (``plugin``, or the plugin whose
        code is running), a reserved core type or an undeclared one raises
        :class:`PluginEventError` and nothing is published.
        """
        from .events import append_event

        plugin = plugin or current_plugin.get()
        if plugin is not None:
            refusal = self.hooks.event_refusal(plugin, type) or self.hooks.payload_refusal(
                plugin, data
            )
            if refusal:
                raise PluginEventError(refusal)
        if not durable:
            message = Message(type, data, timestamp=self.clock())
            self.hub.publish(message)
            self.backplane.publish_live(message)  # best effort: no seq, no backfill
            return message

        def work() -> Change[Message]:
            with self.store.db.atomic():
                message = append_event(type, data, self.clock())
            return Change(message, [message])

        return await commit(self.store, work, self.publish)

    @property
    def last_seq(self) -> int:
        """The seq of the newest durable event this instance knows (where an outbox
        consumer that should not be sent history begins)."""
        return self.hub.last_seq

    async def read_events(self, after: int, limit: int = 100) -> list[Message]:
        """Up to ``limit`` durable events with ``seq > after`` from the event log, oldest
        first, on a reader thread: the outbox for a plugin that hands events on (what
        retention already deleted is simply not there)."""
        return await self.store.read(events_since, after, limit)

    def _remote_event(self, message: Message) -> None:
        """A durable event committed by another instance (plugins ran there)."""
        self.hub.publish(message)

    def _remote_live(self, message: Message) -> None:
        """A live-only event another instance published (its clients have it already)."""
        self.hub.publish(message)

    def _control(self, data: dict[str, Any]) -> None:
        """A nudge from another instance: its credentials changed (re-read ours now), or
        an address reached the failed-authentication limit there (refuse it here too)."""
        if data.get("credentials") and self.auth.sync is not None:
            self.auth.sync.poke()
        blocked, seconds = data.get("blocked"), data.get("seconds")
        if isinstance(blocked, str) and isinstance(seconds, int | float):
            self.auth.failures.block(blocked, float(seconds))

    def _resync(self) -> None:
        self.track(self._sync())

    async def _sync(self) -> None:
        try:
            await self.hub.sequencer.sync()
        except Exception as exc:  # noqa: BLE001 - the next tick tries again
            log.warning("cannot read the event log: %s", exc)

    def _sync_tick(self) -> None:
        """With several instances, read the event log every second while the backplane is
        down and every 5 s while it is up: nothing another instance committed stays
        undelivered, even if its notification was lost."""
        if not self.clustered:
            return
        self._sync_ticks += 1
        if not self.backplane.connected or self._sync_ticks % 5 == 0:
            self._resync()

    def _probe_database(self) -> None:
        """A real round trip each stats interval, so an idle server notices a lost (or
        recovered) database too; one probe at a time, never piling up on a hung server."""
        self.probe.start()

    def broadcast_stats(self) -> None:
        self.hub.publish_stats(self.stats_snapshot())

    def stats_snapshot(self) -> dict[str, Any]:
        """The plugins' stats fields, then the core's own: the load and throttle factor of
        this instance and whether its database answers (there with every plugin off)."""
        snapshot = self.hooks.stats(self, self._stats_claims())
        snapshot.update(self.scheduler.stats_fields())
        load = self.load.current
        snapshot["system_load"] = {
            "instance": self.instance_name,
            "cpu_percent": load.cpu_percent,
            "memory_percent": load.memory_percent,
            "throttle_factor": load.factor,
            "throttle_active": load.throttle_active,
        }
        snapshot["database_available"] = self.store.available
        return snapshot

    def _stats_claims(self) -> dict[str, str]:
        """Who owns which stats field: the core its own, the emitters theirs."""
        return {"system_load": "quotaserver", "database_available": "quotaserver"} | dict(
            self.scheduler.stats_claims
        )

    def _decided(self, decision: Decision) -> None:
        self.metrics.decided(decision)
        self.react("on_decision", decision=decision)

    def _decided_many(self, decisions: list[Decision]) -> None:
        """A batch's decisions, in order: as :meth:`_decided` for each."""
        for decision in decisions:
            self.metrics.decided(decision)
        rest = self.hooks.react_each("on_decision", "decision", decisions, app=self)
        if rest is not None:
            self.track(rest)

    def react(self, hook: str, **kwargs: Any) -> None:
        """Tell the plugins (``hook``), after the fact: what suspends goes on in the
        background; what does not (most reactions) costs no task."""
        rest = self.hooks.react(hook, app=self, **kwargs)
        if rest is not None:
            self.track(rest)

    def _request_finished(self, handler: tornado.web.RequestHandler) -> None:
        log_request(handler)
        self.metrics.request_finished(handler)

    async def _replay(self, after: int, limit: int) -> list[Message]:
        return await self.store.read(events_after, after, limit)

    def track(self, awaitable: Any) -> asyncio.Future:
        """Run ``awaitable`` in the background, keeping a reference until it is done."""
        future = asyncio.ensure_future(awaitable)
        self._tasks.add(future)
        future.add_done_callback(self._tasks.discard)
        return future

    # -- plugins and connections -------------------------------------------------------
    def plugin_config(self, name: str) -> dict[str, Any]:
        """The ``plugins.<name>`` block of the configuration (without ``enabled``)."""
        return {k: v for k, v in self.config.plugin(name).items() if k != "enabled"}

    def plugin_state(self, name: str) -> dict[str, Any]:
        """A dict private to plugin ``name`` for the life of this application: another
        plugin's code asking for it gets a PermissionError (the core and tests may look)."""
        caller = current_plugin.get()
        if caller is not None and caller != name:
            raise PermissionError(f"plugin {caller} may not use the state of plugin {name}")
        return self._plugin_state.setdefault(name, {})

    def stream_types(self) -> frozenset[str]:
        """The event types a stream filter may name: the core's and the plugins' own."""
        return CORE_TYPES | CONTROL_TYPES | frozenset(self.hooks.event_types)

    def connection_refusal(self, identity: Identity) -> str | None:
        """Why one more live connection for ``identity`` is refused now, or None (with
        Redis: this instance's connections and the others' last reported ones)."""
        live = self.hub.per_identity[identity.key]
        if self.cluster_counts is not None:
            live += self.cluster_counts.remote_connections[identity.key]
        return self.limiter.identity_refusal(live)

    def end_revoked(self) -> int:
        """Close, with 1008, every live connection whose credentials are no longer valid
        (revoked or logged out on any process: called after each credentials reload)."""
        valid = self.auth.valid_ids
        return self.hub.close_where(
            lambda c: (
                getattr(c, "token_id", None) is not None
                and not valid(c.token_id, getattr(c, "session_id", None))
            ),
            CLOSE_POLICY,
            "credentials revoked",
        )

    def end_identity(self, *, session_id: str | None = None, token_ids: list[str] = ()) -> int:
        """Close live connections of a logged-out session or revoked tokens with 1008."""
        return self.hub.close_where(
            lambda c: (
                (session_id is not None and getattr(c, "session_id", None) == session_id)
                or getattr(c, "token_id", None) in token_ids
            ),
            CLOSE_POLICY,
            "credentials revoked",
        )


def reap_interval(client_timeout: float) -> float:
    """Seconds between reaper runs: a tenth of the timeout, at most 1 s (one pass over the
    clients costs microseconds per client)."""
    return min(1.0, client_timeout / 10)
