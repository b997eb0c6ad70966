"""The event log (outbox): append inside a transaction, read back for replay.

Persist, then publish: services call :func:`append_event` inside the transaction that makes
the change, and hand the returned message to the publisher only after it committed.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from .models import Event, aware, naive_utc
from .realtime.messages import Message


def append_event(type: str, data: dict[str, Any], now: datetime) -> Message:
    """Insert one event row (call inside a transaction); its id becomes the message seq."""
    row = Event.create(type=type, data=json.dumps(data), created_at=naive_utc(now))
    return Message(type, data, seq=row.id, timestamp=now)


def events_after(after: int, limit: int) -> list[Message]:
    """Up to ``limit`` events with ``seq > after``, oldest first."""
    rows = Event.select().where(Event.id > after).order_by(Event.id).limit(limit)
    return [Message(r.type, r.payload(), seq=r.id, timestamp=aware(r.created_at)) for r in rows]


def last_seq() -> int:
    row = Event.select(Event.id).order_by(Event.id.desc()).first()
    return row.id if row else 0
