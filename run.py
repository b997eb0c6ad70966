#!/usr/bin/env python3
"""Start quotaserver: parse flags, load the configuration, run until SIGINT/SIGTERM.

Exit status: 0 after a clean stop, 2 for a configuration error, 1 if the server cannot
start (for example the port is taken).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

import peewee
import yaml

from quotaserver import __version__
from quotaserver.config import ConfigError, load_config
from quotaserver.netguard import raise_open_files_limit
from quotaserver.plugins import get_plugin_manager
from quotaserver.realtime.messages import CLOSE_GOING_AWAY, CLOSE_RESTART

log = logging.getLogger("quotaserver")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="quotaserver: per-user command quotas")
    parser.add_argument("--config", help="YAML configuration file")
    parser.add_argument("--host", help="listen address (server.host)")
    parser.add_argument("--port", type=int, help="listen port (server.port)")
    parser.add_argument("--dev", action="store_true", default=None, help="development endpoints")
    parser.add_argument("--demo", action="store_true", default=None, help="simulated traffic")
    parser.add_argument(
        "--check-config", action="store_true", help="validate, print the configuration, exit"
    )
    parser.add_argument("--version", action="version", version=f"quotaserver {__version__}")
    return parser.parse_args(argv)


async def serve(config, stop_signals: asyncio.Queue, plugin_manager=None) -> int:
    from quotaserver.app import QuotaApp
    from quotaserver.demo import DemoTraffic

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
    print(f"quotaserver {__version__} listening on {app.url}", flush=True)
    print(f"  dashboard: {app.url}/admin/quotas", flush=True)
    if not config["auth.enabled"]:
        log.warning("AUTHENTICATION IS DISABLED: anyone who can reach %s is an admin", app.url)
    elif app.auth.first_run_token:
        where, minutes = config["auth.token_file"], config["auth.login_code_lifetime"] / 60
        print(f"  admin token stored in {where} (mode 0600); to sign in, open once within "
              f"{minutes:g} min:", flush=True)  # fmt: skip
        print(f"  {app.url}/login#code={app.auth.issue_login_code()}", flush=True)
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
    try:
        await asyncio.wait_for(app.stop(code), timeout=config["server.shutdown_timeout"])
    except TimeoutError:
        log.error("shutdown took longer than %s s", config["server.shutdown_timeout"])
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {
        "server.host": args.host,
        "server.port": args.port,
        "dev": args.dev,
        "demo": args.demo,
    }
    try:
        config = load_config(args.config, overrides=overrides)
        # Plugin names, plugins_dir and plugin settings are configuration too.
        plugin_manager = get_plugin_manager(config)
    except ConfigError as exc:
        print(f"quotaserver: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print(yaml.safe_dump(json.loads(json.dumps(config.as_nested())), sort_keys=False), end="")
        return 0
    logging.basicConfig(
        level=config["server.log_level"].upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    raise_open_files_limit()

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


if __name__ == "__main__":
    sys.exit(main())
