"""quotaserver: per-user command quotas with a live admin dashboard.

The public surface for plugin authors is this package's top level::

    from quotaserver import EventEmitter, PeriodicEmitter, hookimpl
"""

import pluggy

__version__ = "0.1.0"

#: Marker for plugin hook implementations: ``@hookimpl def stats_fields(app): ...``
hookimpl = pluggy.HookimplMarker("quotaserver")

# After hookimpl: the emitters module imports nothing that needs it, but plugins that
# import quotaserver must find the marker however the import order goes.
from .realtime.emitters import EventEmitter, PeriodicEmitter  # noqa: E402

__all__ = ["EventEmitter", "PeriodicEmitter", "__version__", "hookimpl"]
