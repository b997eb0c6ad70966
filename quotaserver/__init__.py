"""quotaserver: per-user command quotas with a live admin dashboard.

The public surface for plugin authors is this package's top level, and nothing else::

    from quotaserver import EventEmitter, MetricSample, PeriodicEmitter, hookimpl
    from quotaserver import readings  # figures from the database (quotaserver.readings)

with the settings checks for ``validate_config`` (``check_plugin_block``,
``positive_number``), ``DatabaseError`` (what a reading raises while the database is
unreachable), ``SEVERITIES`` (of alerts) and ``utilization`` (percent of a limit, rounded as
every answer rounds it). The built-in plugins use exactly these (tests/test_plugin_boundary.py).
"""

from importlib.metadata import PackageNotFoundError, version

import pluggy

try:
    # The one place the version is written is pyproject.toml (bumped per release, with an
    # entry in CHANGELOG.md); the installed package's metadata carries it here.
    __version__ = version("quotaserver")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"

#: Marker for plugin hook implementations: ``@hookimpl def stats_fields(app): ...``
hookimpl = pluggy.HookimplMarker("quotaserver")

# After hookimpl: the emitters module imports nothing that needs it, but plugins that
# import quotaserver must find the marker however the import order goes.
from . import readings  # noqa: E402
from .alerts import SEVERITIES  # noqa: E402
from .config import check_plugin_block, positive_number  # noqa: E402
from .db import DatabaseError  # noqa: E402
from .metrics import MetricSample  # noqa: E402
from .realtime.emitters import EventEmitter, PeriodicEmitter  # noqa: E402
from .standings import utilization  # noqa: E402

__all__ = [
    "SEVERITIES",
    "DatabaseError",
    "EventEmitter",
    "MetricSample",
    "PeriodicEmitter",
    "__version__",
    "check_plugin_block",
    "hookimpl",
    "positive_number",
    "readings",
    "utilization",
]
