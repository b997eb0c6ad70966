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

import pluggy
import yaml

from . import __version__, logs
from .config import Config, ConfigError, load_config
from .credentials import check_tokens, redacted
from .plugins import PluginError, check_setup, get_plugin_manager, plugin_list
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


def _plugin_lines(pm: object) -> list[str]:
    lines = []
    for p in plugin_list(pm):
        version = f" {p['version']}" if p["version"] else ""
        lines.append(f"{p['name']}{version} ({p['source']}: {p['origin']})")
        lines.append(f"  hooks: {', '.join(p['hooks']) or '-'}")
        if p["event_types"]:
            lines.append(f"  event types: {', '.join(p['event_types'])}")
    return lines


@command("check-config", "validate the configuration and plugins, print both, exit (2 if invalid)")
def check_config(args: argparse.Namespace) -> int:
    config, pm = load(args)
    check_setup(config, pm)
    print(yaml.safe_dump(json.loads(json.dumps(redacted(config))), sort_keys=False), end="")
    print("# plugins")
    for line in _plugin_lines(pm):
        print(f"#   {line}")
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
    check_setup(config, pm)  # also collects the event types emitters declare
    if args.json:
        print(json.dumps({"plugins": plugin_list(pm)}, indent=2))
    else:
        for line in _plugin_lines(pm):
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
