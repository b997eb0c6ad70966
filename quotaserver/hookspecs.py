"""The plugin contract. Every hook is documented in docs/plugins.md and tested.

Hooks receive the running :class:`quotaserver.app.QuotaApp` as ``app``; plugins use only its
public API (``app.quota``, ``app.alerts``, ``app.load``, ``app.publish_event``,
``app.store``, ``app.plugin_config``). A hook implementation may be a plain function or a
coroutine function where the spec says "may be awaitable".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from .app import QuotaApp
    from .config import Config
    from .metrics import MetricSample
    from .quota import Decision
    from .realtime.emitters import EventEmitter, PeriodicEmitter
    from .realtime.messages import Message

hookspec = pluggy.HookspecMarker("quotaserver")


@hookspec
def register_emitters(app: QuotaApp) -> list[PeriodicEmitter | EventEmitter] | None:
    """Data sources of this plugin, called once at start-up.

    :param app: the application.
    :return: periodic emitters (run every ``interval``) and event emitters (started with
        an ``emit`` callable, stopped at shutdown). The host runs each one in isolation.
    """


@hookspec
def register_event_types() -> list[str] | None:
    """Event types this plugin emits, called once when plugins load.

    A plugin may emit only the types it declared here or in an emitter's ``event_types``;
    the core types (``violation``, ``alert``, ``quota_change``, ``throttle``, ``stats`` and
    the control types) are reserved. Declared types are listed by ``GET /api/plugins`` so
    stream filters (``?types=``) and the dashboard know them.

    :return: type names matching ``[a-z][a-z0-9_]{0,31}``.
    """


@hookspec
def stats_fields(app: QuotaApp) -> dict[str, Any] | None:
    """Fields this plugin adds to the stats snapshot, called every ``stats_interval``.

    Must be cheap (in-memory figures only): it runs on the IOLoop.

    :return: a mapping of field name to a JSON-serialisable value; None adds nothing.
    """


@hookspec
def health_fields(app: QuotaApp) -> dict[str, Any] | None:
    """This plugin's part of ``GET /api/ws/health``, called for each request on the IOLoop.

    Must be cheap (in-memory figures only). ``"healthy": False`` in the mapping makes the
    health ``status`` ``degraded``.

    :return: a JSON-serialisable mapping, shown under ``plugins_health.<plugin name>``;
        None adds nothing.
    """


@hookspec
def metric_samples(app: QuotaApp) -> list[MetricSample] | None:
    """Values this plugin adds to ``GET /metrics``, called about once a second and before
    each scrape, on the IOLoop (in-memory figures only).

    :return: :class:`quotaserver.MetricSample` values whose names start with
        ``quotaserver_<plugin name>_``; a sample that breaks the rules is refused and
        counted as a failure of this hook.
    """


@hookspec
def on_decision(app: QuotaApp, decision: Decision) -> None:
    """Called after every consume decision (allowed, denied or overloaded) has committed.

    Runs on the IOLoop: keep it quick, or schedule work. May be awaitable.
    """


@hookspec
def on_violation(app: QuotaApp, violation: dict[str, Any]) -> None:
    """Called after a quota violation was committed and published.

    :param violation: the violation payload as sent to clients (``user_id``, ``username``,
        ``command_type``, ``period``, ``limit``, ``attempted``, ``message``).
    May be awaitable.
    """


@hookspec
def on_event(app: QuotaApp, message: Message) -> None:
    """Called after any durable event (violation, alert, quota_change, throttle, or a
    plugin's own) was committed and published. May be awaitable."""


@hookspec
def validate_config(config: Config) -> list[str] | None:
    """Check this plugin's settings, when the configuration is loaded (start-up and
    ``--check-config``), before anything runs.

    :param config: the validated core configuration; ``config.plugin(name)`` is a block.
    :return: error texts, each starting with the key it is about
        (``"plugins.my_plugin.interval: must be a positive number"``). Any error stops
        start-up with exit status 2.
    """


@hookspec
def secret_settings() -> list[str] | None:
    """Names of this plugin's settings that hold secrets (a webhook URL, a DSN, a header).

    ``check-config`` prints ``<redacted>`` for them (it also redacts any setting whose
    name says secret, token, password or API key, and the password of any URL).

    :return: keys of the plugin's block (``plugins.<name>.<key>``).
    """


@hookspec
def config_reloaded(app: QuotaApp, config: Config) -> None:
    """The configuration file was reloaded (SIGHUP): apply what of this plugin's settings
    can change without a restart. ``validate_config`` accepted ``config`` first.

    :param config: the reloaded configuration; ``config.plugin(name)`` is the new block
        (``app.plugin_config`` still returns the one the plugin started with).
    """


@hookspec
def startup(app: QuotaApp) -> None:
    """Called once when the application starts, after the database is ready and before
    emitters run. May be awaitable (for example to load state from the database)."""


@hookspec
def shutdown(app: QuotaApp) -> None:
    """Called once at shutdown, after emitters stopped and clients were closed. May be
    awaitable."""
