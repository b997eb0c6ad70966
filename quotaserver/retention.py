"""Retention: rows older than the configured ages leave the event, violation and activity tables,
and idempotency keys leave when their TTL is over.

Pruning runs on the database thread in small batches (``retention.batch_size`` rows per
transaction), so consumes queued behind it wait for one short batch at most, never for the
whole clean-up, and the IOLoop never waits at all. It is a periodic source of the scheduler
(``retention``), so a failure is logged, backed off and shown in ``/api/ws/health`` and in
``quotaserver_source_up``.

The newest event is never pruned, whatever its age: its id keeps SQLite from handing out
old ids again, and clients' cursors stay meaningful. A client whose cursor is older than the
oldest kept event gets ``recovered: false`` with ``reason: pruned`` (see events.py).
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from peewee import fn

from .idempotency import prune_expired
from .models import Activity, Event, Violation, naive_utc
from .realtime.emitters import PeriodicEmitter

if TYPE_CHECKING:
    from .app import QuotaApp

log = logging.getLogger(__name__)


def _prune_events(cutoff: datetime, batch: int) -> int:
    newest = Event.select(fn.MAX(Event.id)).scalar()
    if newest is None:
        return 0
    ids = (
        Event.select(Event.id)
        .where((Event.created_at < naive_utc(cutoff)) & (Event.id < newest))
        .order_by(Event.id)
        .limit(batch)
    )
    return Event.delete().where(Event.id.in_(ids)).execute()


def _prune_violations(cutoff: datetime, batch: int) -> int:
    ids = (
        Violation.select(Violation.id)
        .where(Violation.created_at < naive_utc(cutoff))
        .order_by(Violation.id)
        .limit(batch)
    )
    return Violation.delete().where(Violation.id.in_(ids)).execute()


def _prune_activity(cutoff: datetime, batch: int) -> int:
    minutes = (
        Activity.select(Activity.minute)
        .where(Activity.minute < int(cutoff.timestamp()))
        .order_by(Activity.minute)
        .limit(batch)
    )
    return Activity.delete().where(Activity.minute.in_(minutes)).execute()


TABLES = {
    "events": _prune_events,
    "violations": _prune_violations,
    "activity": _prune_activity,
}


async def prune(app: QuotaApp) -> dict[str, int]:
    """Delete what is older than each table's retention; return the rows deleted per table."""
    config = app.config
    batch = config["retention.batch_size"]
    now = app.clock()
    deleted: dict[str, int] = {}
    for table, delete_batch in TABLES.items():
        days = config[f"retention.{table}_days"]
        if days <= 0:
            continue  # 0 keeps everything
        cutoff = now - timedelta(days=days)
        total = 0
        while True:
            count = await app.store.run(delete_batch, cutoff, batch)
            total += count
            if count < batch:
                break
        deleted[table] = total
        if total:
            log.info("retention: pruned %d %s rows older than %d days", total, table, days)
    # Idempotency keys go when their own TTL (quotas.idempotency_ttl, set per row) is over.
    total = 0
    while True:
        count = await app.store.run(prune_expired, now, batch)
        total += count
        if count < batch:
            break
    deleted["idempotency_keys"] = total
    if total:
        log.info("retention: pruned %d expired idempotency keys", total)
    return deleted


def emitter(app: QuotaApp) -> PeriodicEmitter:
    """The scheduler source that prunes every ``retention.interval`` seconds."""
    interval = app.config["retention.interval"]

    async def run() -> Any:
        await prune(app)

    # The first run of a large backlog may take a while: batches, not one long transaction.
    return PeriodicEmitter("retention", interval, run, timeout=max(interval, 600.0))
