"""quotaserver: per-user command quotas with a live admin dashboard.

The public surface for plugin authors is this package's top level::

    from quotaserver import EventEmitter, MetricSample, PeriodicEmitter, hookimpl
"""

import pluggy

__version__ = "0.1.0"

#: Marker for plugin hook implementations: ``@hookimpl def stats_fields(app): ...``
hookimpl = pluggy.HookimplMarker("quotaserver")

# After hookimpl: the emitters module imports nothing that needs it, but plugins that
# import quotaserver must find the marker however the import order goes.
from .metrics import MetricSample  # noqa: E402
from .realtime.emitters import EventEmitter, PeriodicEmitter  # noqa: E402

__all__ = ["EventEmitter", "MetricSample", "PeriodicEmitter", "__version__", "hookimpl"]
