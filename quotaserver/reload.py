"""SIGHUP: read the configuration file again and apply what can change without a restart.

Before this, SIGHUP's default action ended the server silently (exit 129, no close code for
the dashboards). Now a running server keeps every connection and applies:

- ``server.log_level``, at once;
- ``quotas.defaults`` and ``quotas.defaults_policy`` (see quotaserver.defaults_policy: under
  ``enforce`` the file's limits are applied, under ``seed`` differences are warned about);
- plugin settings, through each plugin's ``config_reloaded`` hook once every plugin's
  ``validate_config`` accepted them (the alert engine reloads its rules);

Anything else that changed in the file is named in one warning: it takes effect at the next
restart. A file that no longer validates changes nothing (one error line naming the key), so
a typo cannot take a running server down. Logs go to stderr (journald, or whatever the
service manager redirects it to), so there is no log file of quotaserver's own to reopen.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .config import ConfigError, load_config
from .db import DatabaseError
from .defaults_policy import reconcile
from .plugins import apply_env_overrides, check_plugin_settings, plugin_candidates

if TYPE_CHECKING:
    from .app import QuotaApp

log = logging.getLogger("quotaserver")

#: Applied by a reload.
RELOADABLE = frozenset({"server.log_level", "quotas.defaults", "quotas.defaults_policy"})
#: Kept as the running process has them: command-line flags (--host, --port, --dev, --demo,
#: --workers) may have set them, and a worker's name (and, when none is configured, the
#: backplane secret) is given by its launcher.
PINNED = (
    "server.host",
    "server.port",
    "dev",
    "demo",
    "server.workers",
    "server.instance_name",
    "backplane.secret",
)


async def reload_config(app: QuotaApp, apply_defaults: bool = True) -> bool:
    """Re-read ``app.config.source`` and apply the reloadable settings; False if the file
    is invalid (nothing changes then). ``apply_defaults``: this process owns the limits
    (one process, or the first worker)."""
    current = app.config
    try:
        new = load_config(current.source, overrides={key: current[key] for key in PINNED})
        names = plugin_candidates(new)
        apply_env_overrides(new, names)  # QUOTASERVER_PLUGINS_*, as at start-up
        check_plugin_settings(app.pm, new, names)
    except ConfigError as exc:
        log.error("SIGHUP: configuration not reloaded, nothing changed: %s", exc)
        return False
    root = logging.getLogger()
    level = new["server.log_level"].upper()
    if logging.getLevelName(root.level) != level:
        root.setLevel(level)
    log.info("SIGHUP: configuration reloaded from %s (log level %s)", current.source, level)
    if apply_defaults:
        try:
            await reconcile(app.quota, new, app.publish)
        except DatabaseError as exc:
            log.error("SIGHUP: quota defaults not applied: %s", exc.message)
    # Each plugin applies what it can (the alert engine: its rules), isolated and timed.
    await app.hooks.call_async("config_reloaded", app=app, config=new)
    later = sorted(key for key in new if key not in RELOADABLE and new[key] != current[key])
    if new.plugins != current.plugins:
        later.append("plugins (beyond what their config_reloaded hook applies)")
    if later:
        log.warning("SIGHUP: changed but applied only at the next restart: %s", ", ".join(later))
    return True
