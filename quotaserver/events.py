"""The event log (outbox): append inside a transaction, read back for replay.

Persist, then publish: services call :func:`append_event` inside the transaction that makes
the change, and hand the returned message to the publisher only after it committed.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from peewee import PostgresqlDatabase, fn

from .models import Event, aware, database_proxy, naive_utc
from .realtime.messages import Message

# Any constant: the key of the PostgreSQL advisory lock that orders event commits.
_EVENT_LOCK = 0x71756F7461


def append_event(type: str, data: dict[str, Any], now: datetime) -> Message:
    """Insert one event row (call inside a transaction); its id becomes the message seq."""
    db = database_proxy.obj
    if isinstance(db, PostgresqlDatabase):
        # Sequence ids are handed out before commit, so two writers could commit 6 before
        # 5; a client that saw 6 would then never be replayed 5. Holding this lock until
        # COMMIT makes event ids commit in order (SQLite has a single writer already).
        db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_EVENT_LOCK,))
    row = Event.create(type=type, data=json.dumps(data), created_at=naive_utc(now))
    return Message(type, data, seq=row.id, timestamp=now)


class EventsPruned(Exception):
    """Events after the cursor were deleted by retention: a replay would have a gap."""


def pruned_after(after: int) -> bool:
    """Whether retention deleted events with ``seq > after`` (the oldest kept is later).

    Retention never deletes the newest event, so an empty table means nothing was pruned.
    """
    oldest = Event.select(fn.MIN(Event.id)).scalar()
    return oldest is not None and after + 1 < oldest


def events_after(after: int, limit: int) -> list[Message]:
    """Up to ``limit`` events with ``seq > after``, oldest first.

    Raises :class:`EventsPruned` when some of them are gone (see :func:`pruned_after`).
    """
    if pruned_after(after):
        raise EventsPruned
    return events_since(after, limit)


def events_since(after: int, limit: int) -> list[Message]:
    """Up to ``limit`` of the events still kept with ``seq > after``, oldest first (a
    reader that can live with what retention deleted: an outbox consumer)."""
    rows = Event.select().where(Event.id > after).order_by(Event.id).limit(limit)
    return [Message(r.type, r.payload(), seq=r.id, timestamp=aware(r.created_at)) for r in rows]


def last_seq() -> int:
    row = Event.select(Event.id).order_by(Event.id.desc()).first()
    return row.id if row else 0
