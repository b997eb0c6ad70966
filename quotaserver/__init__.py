"""quotaserver: per-user command quotas with a live admin dashboard.

The public surface for plugin authors is this package's top level::

    from quotaserver import EventEmitter, MetricSample, PeriodicEmitter, hookimpl
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
from .metrics import MetricSample  # noqa: E402
from .realtime.emitters import EventEmitter, PeriodicEmitter  # noqa: E402

__all__ = ["EventEmitter", "MetricSample", "PeriodicEmitter", "__version__", "hookimpl"]
