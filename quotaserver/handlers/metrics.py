"""GET /metrics: the Prometheus text format (see quotaserver/metrics.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..metrics import CONTENT_TYPE_LATEST
from .base import BaseHandler

if TYPE_CHECKING:
    from ..app import QuotaApp

METRICS = frozenset({"metrics"})


class MetricsHandler(BaseHandler):
    """A ``metrics`` token or admin; public when ``metrics.public`` is true."""

    def initialize(self, app: QuotaApp) -> None:
        super().initialize(app)
        # Per request, so the security tests read the effective roles of this app.
        self.roles = None if app.config["metrics.public"] else METRICS

    async def get(self) -> None:
        body = await self.app.metrics.exposition()
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(body)
