"""The audit log of admin changes: who changed what, and when."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from .models import AuditLog, aware, naive_utc
from .windows import isoformat


def record_audit(actor: str, action: str, target: str, details: dict, now: datetime) -> None:
    """Append one audit row (call inside the transaction that makes the change)."""
    AuditLog.create(
        actor=actor,
        action=action,
        target=target,
        details=json.dumps(details),
        created_at=naive_utc(now),
    )


def audit_json(row: AuditLog) -> dict[str, Any]:
    return {
        "id": row.id,
        "actor": row.actor,
        "action": row.action,
        "target": row.target,
        "details": json.loads(row.details),
        "created_at": isoformat(aware(row.created_at)),
    }
