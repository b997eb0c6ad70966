"""Run a configured server in this process until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time

import peewee
import pluggy

from . import __version__
from .config import Config, ConfigError
from .realtime.messages import CLOSE_GOING_AWAY, CLOSE_RESTART

log = logging.getLogger("quotaserver")


async def serve(
    config: Config, stop_signals: asyncio.Queue, plugin_manager: pluggy.PluginManager | None = None
) -> int:
    """Start the app, print where it listens, wait for a stop signal, stop within the budget."""
    from .app import QuotaApp
    from .demo import DemoTraffic

    app = QuotaApp(config, plugin_manager=plugin_manager)
    try:
        await app.start()
    except OSError as exc:
        print(
            f"quotaserver: cannot listen on {config['server.host']}:{config['server.port']}: "
            f"{exc.strerror}",
            file=sys.stderr,
        )
        await app.stop()
        return 1
    except peewee.OperationalError as exc:
        print(f"quotaserver: cannot use the database: {exc}".strip(), file=sys.stderr)
        await app.stop()
        return 1
    log.info("started quotaserver %s on %s (pid %d)", __version__, app.url, os.getpid())
    print(f"quotaserver {__version__} listening on {app.url}", flush=True)
    print(f"  dashboard: {app.url}/admin/quotas", flush=True)
    if not config["auth.enabled"]:
        log.warning("AUTHENTICATION IS DISABLED: anyone who can reach %s is an admin", app.url)
    elif app.auth.first_run_token:
        where = config["auth.token_file"]
        print(f"  admin token stored in {where} (mode 0600); open to sign in:", flush=True)
        print(f"  {app.url}/login?token={app.auth.first_run_token}", flush=True)
    demo = None
    if config["demo"]:
        demo = DemoTraffic(app)
        await demo.start()
        print("  demo traffic: on (simulated users call the quota API)", flush=True)
    signum = await stop_signals.get()
    log.info("received %s, shutting down", signal.Signals(signum).name)
    if demo is not None:
        await demo.stop()
    code = CLOSE_RESTART if signum == signal.SIGTERM else CLOSE_GOING_AWAY
    started = time.monotonic()
    try:
        await asyncio.wait_for(app.stop(code), timeout=config["server.shutdown_timeout"])
    except TimeoutError:
        log.error("shutdown took longer than %s s", config["server.shutdown_timeout"])
        return 1
    log.info("shutdown complete in %.1f s", time.monotonic() - started)
    return 0


def run_server(config: Config, plugin_manager: pluggy.PluginManager | None = None) -> int:
    """Serve in this process on a new event loop; return the exit status."""

    async def runner() -> int:
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, queue.put_nowait, sig)
        try:
            return await serve(config, queue, plugin_manager)
        except ConfigError as exc:
            print(f"quotaserver: configuration error: {exc}", file=sys.stderr)
            return 2

    return asyncio.run(runner())
