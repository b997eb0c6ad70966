"""The ``quotaserver`` command: ``serve`` (default), ``check-config``, ``migrate``, ``plugins``,
``new-plugin``.

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
import threading
from collections.abc import Callable
from typing import Any

import pluggy
import yaml

from . import __version__, logs
from .config import Config, ConfigError, load_config
from .connect_check import check_connections
from .credentials import check_tokens
from .display import display_config, limits_lines, secret_presence
from .plugins import PluginError, check_setup, get_plugin_manager, plugin_list, secret_settings
from .redaction import install_log_redaction

log = logging.getLogger("quotaserver")

#: name -> (help, function(args) -> exit status). Subcommands register here.
COMMANDS: dict[str, tuple[str, Callable[[argparse.Namespace], int]]] = {}
#: name -> adds the command's own arguments (default: the server options)
OPTIONS: dict[str, Callable[[argparse.ArgumentParser], None]] = {}


def command(
    name: str, help: str, options: Callable[[argparse.ArgumentParser], None] | None = None
) -> Callable:
    def register(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (help, fn)
        if options is not None:
            OPTIONS[name] = options
        return fn

    return register


def _server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML configuration file")
    parser.add_argument("--host", help="listen address (server.host)")
    parser.add_argument("--port", type=int, help="listen port (server.port)")
    parser.add_argument("--dev", action="store_true", default=None, help="development endpoints")
    parser.add_argument("--demo", action="store_true", default=None, help="simulated traffic")
    parser.add_argument(
        "--workers", type=int, help="processes serving the port (server.workers; >1 needs Redis)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quotaserver", description="quotaserver: per-user command quotas"
    )
    parser.add_argument("--version", action="version", version=f"quotaserver {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, _fn) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        OPTIONS.get(name, _server_options)(child)
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
        "server.host": getattr(args, "host", None),
        "server.port": getattr(args, "port", None),
        "dev": getattr(args, "dev", None),
        "demo": getattr(args, "demo", None),
        "server.workers": getattr(args, "workers", None),
    }
    config = load_config(args.config, overrides=overrides)
    check_tokens(config, os.environ)
    # Before plugins load: at debug level a plugin's load error shows its traceback.
    logs.configure(config)
    install_log_redaction()  # process-wide: a token-shaped string never reaches a log line
    # Plugin names, plugins_dir and plugin settings are configuration too.
    return config, get_plugin_manager(config)


@command("serve", "run the server until SIGINT/SIGTERM (the default command)")
def serve_command(args: argparse.Namespace) -> int:
    config, plugin_manager = load(args)
    from .netguard import raise_open_files_limit
    from .server import run_server

    raise_open_files_limit()
    status = run_server(config, plugin_manager)
    main_thread = threading.main_thread()
    stuck = [t.name for t in threading.enumerate() if not t.daemon and t is not main_thread]
    if stuck:
        # Python would wait for these forever at exit (a plugin's own threads).
        log.warning("exiting without waiting for threads: %s", ", ".join(stuck))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _plugin_lines(plugins: list[dict[str, Any]]) -> list[str]:
    lines = []
    for p in plugins:
        version = f" {p['version']}" if p["version"] else ""
        lines.append(f"{p['name']}{version} ({p['source']}: {p['origin']})")
        lines.append(f"  hooks: {', '.join(p['hooks']) or '-'}")
        if p["event_types"]:
            lines.append(f"  event types: {', '.join(p['event_types'])}")
        for e in p.get("emitters", []):
            every = f" every {e['interval']:g} s" if "interval" in e else ""
            field = f", stats field {e['stats_field']}" if "stats_field" in e else ""
            lines.append(f"  emitter: {e['name']} ({e['kind']}{every}{field})")
        if p.get("stats_fields"):
            lines.append(f"  stats fields: {', '.join(p['stats_fields'])}")
        if p.get("settings"):
            shown = ", ".join(f"{k}={json.dumps(v)}" for k, v in p["settings"].items())
            lines.append(f"  settings: {shown}")
    return lines


def _check_config_options(parser: argparse.ArgumentParser) -> None:
    _server_options(parser)
    parser.add_argument(
        "--connect",
        action="store_true",
        help="also reach the database and the backplane (exit 2 naming what failed)",
    )


@command(
    "check-config",
    "validate the configuration and plugins, print both, exit (2 if invalid)",
    _check_config_options,
)
def check_config(args: argparse.Namespace) -> int:
    config, pm = load(args)
    check_setup(config, pm)
    shown = display_config(config, secret_settings(pm))
    print(yaml.safe_dump(json.loads(json.dumps(shown)), sort_keys=False), end="")
    print("# plugins")
    for line in _plugin_lines(plugin_list(pm)):
        print(f"#   {line}")
    print("# secrets (present or not; values are never printed)")
    for line in secret_presence(config, os.environ):
        print(f"#   {line}")
    if not getattr(args, "connect", False):
        return 0
    report = check_connections(config)
    print("# connections")
    for line in report.notes:
        print(f"#   {line}")
    if report.limits is not None:
        print("# limits in force (the database's global defaults)")
        for line in limits_lines(config, report.limits):
            print(f"#   {line}")
    for problem in report.problems:
        print(f"quotaserver: check-config --connect: {problem}", file=sys.stderr)
    if report.problems:
        return 2
    print("#   no problem reaching them")
    return 0


def _config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML configuration file")


@command(
    "migrate",
    "apply pending database migrations and seed default limits, then exit (a release step)",
    _config_options,
)
def migrate_command(args: argparse.Namespace) -> int:
    from .server import run_migrations

    config, pm = load(args)
    return run_migrations(config, pm)


def _plugins_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML configuration file")
    parser.add_argument("--json", action="store_true", help="print JSON")


@command("plugins", "list the plugins that load: name, version, source, hooks", _plugins_options)
def plugins_command(args: argparse.Namespace) -> int:
    config, pm = load(args)
    registered = check_setup(config, pm)  # also collects the event types emitters declare
    settings = display_config(config, secret_settings(pm)).get("plugins", {})
    plugins = plugin_list(pm)
    for p in plugins:
        p["emitters"] = registered.get(p["name"], {}).get("emitters", [])
        p["stats_fields"] = registered.get(p["name"], {}).get("stats_fields", [])
        p["settings"] = settings.get(p["name"], {})
    if args.json:
        print(json.dumps({"plugins": plugins}, indent=2))
    else:
        for line in _plugin_lines(plugins):
            print(line)
    return 0


def _new_plugin_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="plugin name: lowercase letters, digits and _")
    parser.add_argument("--dir", required=True, help="directory to create (must be empty)")


@command("new-plugin", "write an installable plugin package with a test", _new_plugin_options)
def new_plugin_command(args: argparse.Namespace) -> int:
    from .scaffold import write_plugin

    for path in write_plugin(args.name, args.dir):
        print(f"wrote {path}")
    print(f"next: pip install -e '{args.dir}[test]' && pytest {args.dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _help, fn = COMMANDS[args.command]
    try:
        return fn(args)
    except PluginError as exc:
        print(f"quotaserver: plugin error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"quotaserver: configuration error: {exc}", file=sys.stderr)
        return 2
