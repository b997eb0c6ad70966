"""Run a configured server until SIGINT/SIGTERM: in this process, or as N worker processes
sharing one listening socket (``server.workers``). SIGHUP reloads what can change without a
restart (quotaserver.reload); the launcher hands it to every worker."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import secrets
import signal
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import peewee
import pluggy
import tornado.netutil
from tornado.ioloop import PeriodicCallback

from . import __version__
from .config import Config, ConfigError
from .db import DatabaseError
from .defaults_policy import reconcile as reconcile_defaults
from .isolation import exit_guard, stop_requested, watch_signals
from .metrics import MULTIPROC_ENV, disable_multiprocess, enable_multiprocess, worker_exited
from .realtime.gc_steps import GcSteps
from .realtime.messages import CLOSE_GOING_AWAY, CLOSE_RESTART
from .reload import reload_config

if TYPE_CHECKING:
    from .app import QuotaApp

log = logging.getLogger("quotaserver")


@dataclass(frozen=True)
class Worker:
    """What a forked worker process gets from its parent."""

    index: int
    sockets: list[socket.socket]
    demo_token: str | None
    ready: Callable[[], object]  # tells the parent this worker listens


async def serve(
    config: Config,
    stop_signals: asyncio.Queue,
    plugin_manager: pluggy.PluginManager | None = None,
    worker: Worker | None = None,
) -> int:
    """Start the app, say where it listens, wait for a stop signal, stop within the budget.

    A forked ``worker`` listens on its own sockets and leaves the announcements to the
    parent; only worker 0 runs the demo traffic, every worker accepts its token and the
    start-up link's code (both made by the parent), and each tells the parent once it
    listens.
    """
    from .app import QuotaApp
    from .demo import DemoTraffic

    app = QuotaApp(config, plugin_manager=plugin_manager)
    app.owns_defaults = worker is None  # the launcher applied them before forking
    try:
        await app.start(sockets=worker.sockets if worker else None)
    except OSError as exc:
        print(
            f"quotaserver: cannot listen on {config['server.host']}:{config['server.port']}: "
            f"{exc.strerror}",
            file=sys.stderr,
        )
        await _stopped(app)
        return 1
    except (peewee.OperationalError, DatabaseError) as exc:
        print(f"quotaserver: cannot use the database: {exc}".strip(), file=sys.stderr)
        await _stopped(app)
        return 1
    except ConfigError:
        await _stopped(app)  # release threads and connections before the one-line error
        raise
    log.info("started quotaserver %s on %s (pid %d)", __version__, app.url, os.getpid())
    # What start-up built lives as long as the process: keep it out of every collection,
    # so full collections (seen at 1-2 s with thousands of clients) scan only newer objects;
    # then do the same for accepted connections, step by step (realtime/gc_steps.py).
    gc.freeze()
    gc_steps = PeriodicCallback(GcSteps(app.hub.count).tick, 500)
    gc_steps.start()
    if worker is None:
        announce(app.url, config, await app.auth.issue_login_code())
    else:  # the parent stored the start-up link's code in the shared database
        worker.ready()
        log.info("worker %d (pid %d) serving as %s", worker.index, os.getpid(), app.instance_name)
    demo = None
    if config["demo"] and worker and worker.index:
        app.auth.add_token(worker.demo_token, "demo", "service")
    elif config["demo"]:
        demo = DemoTraffic(app, token=worker.demo_token if worker else None)
        await demo.start()
        print("  demo traffic: on (simulated users call the quota API)", flush=True)
    while (signum := await stop_signals.get()) == signal.SIGHUP:
        # The first worker applies the quota defaults for all (they share the database).
        await reload_config(app, apply_defaults=worker is None or worker.index == 0)
    gc_steps.stop()
    log.info("received %s, shutting down", signal.Signals(signum).name)
    if demo is not None:
        await demo.stop()
    code = CLOSE_RESTART if signum == signal.SIGTERM else CLOSE_GOING_AWAY
    started = time.monotonic()
    try:
        await asyncio.wait_for(_stopped(app, code), timeout=config["server.shutdown_timeout"])
    except TimeoutError:
        log.error("shutdown took longer than %s s", config["server.shutdown_timeout"])
        return 1
    log.info("shutdown complete in %.1f s", time.monotonic() - started)
    return 0


async def _stopped(app: QuotaApp, *args: Any) -> None:
    """Stop the app of this ``serve`` process: first arm the exit guard (the process ends
    within the budget whatever a plugin does), a process-wide matter, not the app's."""
    stop_requested.set()
    await app.stop(*args)


def announce(url: str, config: Config, login_code: str | None, workers: int = 1) -> None:
    """The start-up lines: where to connect, and how to sign in the first time (a one-time
    code in the link's fragment, which browsers never send to a server or a log)."""
    suffix = f" ({workers} worker processes)" if workers > 1 else ""
    print(f"quotaserver {__version__} listening on {url}{suffix}", flush=True)
    print(f"  dashboard: {url}/admin/quotas", flush=True)
    if not config["auth.enabled"]:
        log.warning("AUTHENTICATION IS DISABLED: anyone who can reach %s is an admin", url)
    elif login_code:
        where, minutes = config["auth.token_file"], config["auth.login_code_lifetime"] / 60
        print(f"  admin token stored in {where} (mode 0600); to sign in, open once within "
              f"{minutes:g} min:", flush=True)  # fmt: skip
        print(f"  {url}/login#code={login_code}", flush=True)


def run_server(config: Config, plugin_manager: pluggy.PluginManager | None = None) -> int:
    """Serve until stopped; return the exit status."""
    if config["server.workers"] > 1:
        return run_workers(config, plugin_manager)
    return _run_loop(config, plugin_manager)


def _run_loop(
    config: Config, plugin_manager: pluggy.PluginManager | None, worker: Worker | None = None
) -> int:
    # Whatever a plugin does, this process ends within the shutdown budget (plus a second
    # for the last log lines) once a stop began. Armed here, after any fork.
    exit_guard(config["server.shutdown_timeout"] + 1.0)

    async def runner() -> int:
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        # Not loop.add_signal_handler: a loop blocked by plugin code would never read
        # them. A thread receives them, arms the exit guard and hands them to the loop.
        watch_signals(
            (signal.SIGINT, signal.SIGTERM, signal.SIGHUP),
            lambda sig: loop.call_soon_threadsafe(queue.put_nowait, sig),
            stopping=frozenset({signal.SIGINT, signal.SIGTERM}),
        )
        try:
            return await serve(config, queue, plugin_manager, worker)
        except ConfigError as exc:
            print(f"quotaserver: configuration error: {exc}", file=sys.stderr)
            return 2

    return asyncio.run(runner())


async def prepare(config: Config, plugin_manager: pluggy.PluginManager | None) -> str | None:
    """Start-up work done once, before the fork: migrations, default limits, the first-run
    token, the cookie secret (workers racing to create them would disagree) and the
    start-up link's one-time code (stored: it works once, on whichever worker). Returns
    the code, if a first-run token is in use."""
    from .app import QuotaApp

    app = QuotaApp(config, plugin_manager=plugin_manager)
    try:
        await app.store.run(app.store.migrate, app.quota.seed_defaults)
        await app.auth.load(app.store, app.clock)
        # Once for all workers: their notifications would go to no client yet.
        await reconcile_defaults(app.quota, config, publish=lambda messages: None)
        return await app.auth.issue_login_code()
    finally:
        await asyncio.get_running_loop().run_in_executor(None, app.store.close)


def run_migrations(config: Config, plugin_manager: pluggy.PluginManager | None) -> int:
    """``quotaserver migrate``: apply the migrations, seed the default limits and apply
    ``quotas.defaults_policy`` as ``serve`` would, alone (a release step before new
    versions serve), then exit. Safe beside running servers and other migrators: they take
    turns on the same lock."""
    from .app import QuotaApp

    async def run() -> int:
        app = QuotaApp(config, plugin_manager=plugin_manager)
        try:
            version = await app.store.run(app.store.migrate, app.quota.seed_defaults)
            # Limits are read from the database per decision, so running servers enforce an
            # applied change at once; this process has no client to notify of it.
            await reconcile_defaults(app.quota, config, publish=lambda messages: None)
            return version
        finally:
            await asyncio.get_running_loop().run_in_executor(None, app.store.close)

    try:
        version = asyncio.run(run())
    except (peewee.OperationalError, DatabaseError) as exc:
        print(f"quotaserver: cannot use the database: {exc}".strip(), file=sys.stderr)
        return 1
    print(f"quotaserver {__version__}: the database is at schema version {version}")
    return 0


def _reserve_port(host: str, port: int) -> socket.socket:
    """A bound, non-listening SO_REUSEPORT socket: it fixes the port (a free one for 0) that
    every worker then listens on with its own socket, and accepts no connection itself."""
    reservation = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reservation.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        reservation.bind((host or "0.0.0.0", port))
    except OSError:
        reservation.close()
        raise
    return reservation


def run_workers(config: Config, plugin_manager: pluggy.PluginManager | None) -> int:
    """Prepare once, fork ``server.workers`` processes that listen on one port.

    Each worker listens on its own SO_REUSEPORT socket, so the kernel spreads connections
    evenly over them (a shared socket lets whichever worker wakes first take them all:
    seen as every dashboard on one worker). Where SO_REUSEPORT is missing, the workers
    share one socket bound here. The parent announces the port once every worker listens,
    forwards SIGTERM/SIGINT to the workers and waits for them within the shutdown budget
    (then kills what is left); a worker that dies on its own is replaced. Nothing that
    holds threads, an event loop or a database connection crosses the fork.
    """
    count = config["server.workers"]
    shared: list[socket.socket] | None = None
    try:
        if hasattr(socket, "SO_REUSEPORT"):
            reservation = _reserve_port(config["server.host"], config["server.port"])
            port = reservation.getsockname()[1]
        else:
            shared = tornado.netutil.bind_sockets(
                config["server.port"], config["server.host"], family=socket.AF_INET
            )
            reservation, port = shared[0], shared[0].getsockname()[1]
    except OSError as exc:
        print(
            f"quotaserver: cannot listen on {config['server.host']}:{config['server.port']}: "
            f"{exc.strerror}",
            file=sys.stderr,
        )
        return 1
    # Multiprocess metrics start after prepare(): this process's app must write no series
    # of its own (a launcher's throttle_factor of 0 and empty worker figures, forever).
    metrics_dir = os.environ.pop(MULTIPROC_ENV, None)
    if config["backplane.url"] and not config["backplane.secret"]:
        # Workers of one machine may share a secret made here; another instance on the
        # same Redis would need it too, so say how to set one.
        config = config.with_overrides(backplane__secret=secrets.token_hex(32))
        log.warning(
            "backplane.secret is not set: generated one for these %d workers only; set "
            "QUOTASERVER_BACKPLANE_SECRET on every instance that shares %s",
            count,
            config["backplane.channel"],
        )
    # One deployment's database connections, divided: N pools of pool_size each would
    # multiply the connections by N and have the workers' threads contend for the cores.
    config = config.with_overrides(
        database__pool_size=max(1, config["database.pool_size"] // count)
    )
    try:
        login_code = asyncio.run(prepare(config, plugin_manager))
    except (peewee.OperationalError, DatabaseError) as exc:
        print(f"quotaserver: cannot use the database: {exc}".strip(), file=sys.stderr)
        return 1
    # Every worker's figures reach /metrics whichever worker answers the scrape.
    own_metrics_dir = not metrics_dir
    metrics_dir = metrics_dir or tempfile.mkdtemp(prefix="quotaserver-metrics-")
    enable_multiprocess(metrics_dir)
    try:
        return _supervise(config, plugin_manager, count, port, shared, reservation, login_code)
    finally:
        disable_multiprocess(metrics_dir, remove=own_metrics_dir)


def _supervise(
    config: Config,
    plugin_manager: pluggy.PluginManager | None,
    count: int,
    port: int,
    shared: list[socket.socket] | None,
    reservation: socket.socket,
    login_code: str | None,
) -> int:
    """Fork the workers, announce once all listen, replace those that die, stop them."""
    supervisor = _Supervisor(config, plugin_manager, count, port, shared, login_code)
    try:
        return supervisor.run()
    finally:
        for sock in shared or [reservation]:
            sock.close()
        supervisor.close()


class _Supervisor:
    """The parent of ``server.workers`` processes (see :func:`run_workers`)."""

    def __init__(
        self,
        config: Config,
        plugin_manager: pluggy.PluginManager | None,
        count: int,
        port: int,
        shared: list[socket.socket] | None,
        login_code: str | None,
    ):
        self.config, self.plugin_manager = config, plugin_manager
        self.count, self.port, self.shared, self.login_code = count, port, shared, login_code
        self.base_name = config["server.instance_name"] or f"{socket.gethostname()}:{port}"
        self.demo_token = secrets.token_urlsafe(24) if config["demo"] else None
        self.ready_read, self.ready_write = os.pipe()
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (worker index, start)
        self.stopping: list[int] = []
        self.ready = 0
        self.status = 0
        self.deadline: float | None = None
        self.restarts = 0

    def close(self) -> None:
        os.close(self.ready_read)
        os.close(self.ready_write)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.forward)
        signal.signal(signal.SIGINT, self.forward)
        signal.signal(signal.SIGHUP, self.signal_all)  # each worker reloads its own settings
        for index in range(self.count):
            self.spawn(index)
        os.set_blocking(self.ready_read, False)
        while self.children:
            self._count_ready()
            self._enforce_shutdown_budget()
            try:
                pid, raw = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.05)
                continue
            self._reap(pid, os.waitstatus_to_exitcode(raw))
        return self.status

    def spawn(self, index: int) -> None:
        config = self.config
        worker_config = config.with_overrides(server__instance_name=f"{self.base_name}/{index}")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the worker's loop has it
                os.close(self.ready_read)
                sockets = self.shared or tornado.netutil.bind_sockets(
                    self.port, config["server.host"], family=socket.AF_INET, reuse_port=True
                )
                ready_write = self.ready_write
                worker = Worker(
                    index, sockets, self.demo_token, lambda: os.write(ready_write, b".")
                )
                code = _run_loop(worker_config, self.plugin_manager, worker)
            except BaseException:  # noqa: BLE001 - report, then leave without cleanup
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        self.children[pid] = (index, time.monotonic())

    def signal_all(self, signum: int, _frame: object = None) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def forward(self, signum: int, _frame: object = None) -> None:
        self.stopping.append(signum)
        self.signal_all(signum)

    def _count_ready(self) -> None:
        if self.ready >= self.count:
            return
        with contextlib.suppress(BlockingIOError):
            self.ready += len(os.read(self.ready_read, 256))
        if self.ready >= self.count:  # every worker listens: now clients can come
            host = self.config["server.host"]
            host = "127.0.0.1" if host in ("0.0.0.0", "") else host
            announce(f"http://{host}:{self.port}", self.config, self.login_code, self.count)

    def _enforce_shutdown_budget(self) -> None:
        if self.stopping and self.deadline is None:
            self.deadline = time.monotonic() + self.config["server.shutdown_timeout"] + 1
        if self.deadline is not None and time.monotonic() > self.deadline:
            log.error("workers still running after the shutdown budget: killing them")
            self.signal_all(signal.SIGKILL)
            self.status = 1
            self.deadline = float("inf")

    def _reap(self, pid: int, code: int) -> None:
        """A worker exited: count it while stopping, else stop all or start a new one."""
        index, started = self.children.pop(pid)
        worker_exited(pid)
        if self.stopping:
            if code != 0 and self.status == 0:
                self.status = 1
            return
        if code == 2:  # a configuration error: every worker would fail the same way
            self.forward(signal.SIGTERM)
            self.status = 2
            return
        log.error("worker %d (pid %d) exited with %d; starting a new one", index, pid, code)
        self.restarts += 1
        if time.monotonic() - started < 1 and self.restarts > 10 * self.count:
            log.error("workers keep failing at start-up; giving up")
            self.forward(signal.SIGTERM)
            self.status = 1
            return
        self.spawn(index)
