"""The ``quotaserver`` command: ``serve`` (the default) and ``check-config``.

``python -m quotaserver``, the ``quotaserver`` console script and ``run.py`` all land here.
Exit status: 0 after a clean stop, 2 for a configuration error, 1 if the server cannot
start (for example the port is taken).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable

import pluggy
import yaml

from . import __version__, logs
from .config import Config, ConfigError, load_config
from .credentials import check_tokens, redacted
from .plugins import get_plugin_manager

log = logging.getLogger("quotaserver")

#: name -> (help, function(args) -> exit status). Subcommands register here.
COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {}


def command(name: str, help: str) -> Callable:
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (help, fn)
        return fn

    return register


def _server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML configuration file")
    parser.add_argument("--host", help="listen address (server.host)")
    parser.add_argument("--port", type=int, help="listen port (server.port)")
    parser.add_argument("--dev", action="store_true", default=None, help="development endpoints")
    parser.add_argument("--demo", action="store_true", default=None, help="simulated traffic")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quotaserver", description="quotaserver: per-user command quotas"
    )
    parser.add_argument("--version", action="version", version=f"quotaserver {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, _fn) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        _server_options(child)
        if name == "serve":
            # Kept for scripts written against run.py before check-config was a command.
            child.add_argument("--check-config", action="store_true", help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    # ``serve`` is the default command: ``quotaserver --config x.yaml`` serves.
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help", "--version")):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    if getattr(args, "check_config", False):
        args.command = "check-config"
    return args


def load(args: argparse.Namespace) -> tuple[Config, pluggy.PluginManager]:
    """The configuration and plugin manager from flags; raises :class:`ConfigError`."""
    overrides = {
        "server.host": args.host,
        "server.port": args.port,
        "dev": args.dev,
        "demo": args.demo,
    }
    config = load_config(args.config, overrides=overrides)
    check_tokens(config, os.environ)
    # Plugin names, plugins_dir and plugin settings are configuration too.
    return config, get_plugin_manager(config)


@command("serve", "run the server until SIGINT/SIGTERM (the default command)")
def serve_command(args: argparse.Namespace) -> int:
    config, plugin_manager = load(args)
    logs.configure(config)
    from .server import run_server

    return run_server(config, plugin_manager)


@command("check-config", "validate the configuration, print it, exit (2 if invalid)")
def check_config(args: argparse.Namespace) -> int:
    config, _pm = load(args)
    print(yaml.safe_dump(json.loads(json.dumps(redacted(config))), sort_keys=False), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _help, fn = COMMANDS[args.command]
    try:
        return fn(args)
    except ConfigError as exc:
        print(f"quotaserver: configuration error: {exc}", file=sys.stderr)
        return 2
