"""AlertService: persist alerts (one live alert per rule, user and day), acknowledge, resolve.

Rules that decide *when* to raise an alert live in the alert-engine plugin; this module
owns the storage and the events, so every alert change is persisted, then published.
"""

from __future__ import annotations

import functools
from datetime import datetime
from typing import Any

from .audit import record_audit
from .change import Change, Publish, commit
from .db import Store
from .errors import DomainError
from .events import append_event
from .models import Alert, User, aware, naive_utc
from .realtime.messages import Message
from .windows import Clock, isoformat, utc_now

SEVERITIES = ("low", "medium", "high", "critical")
STATUSES = ("open", "acknowledged", "resolved")


class AlertNotFound(DomainError, LookupError):
    status = 404
    code = "unknown_alert"
    default_message = "no such alert"


def alert_json(row: Alert, username: str | None = None) -> dict[str, Any]:
    if username is None and row.user_id is not None:
        username = row.user.username
    return {
        "alert_id": row.id,
        "alert_type": row.rule,
        "severity": row.severity,
        "user_id": row.user_id,
        "username": username,
        "message": row.message,
        # Protocol 2: a boolean, as protocol 1 clients expect; the advice is in "action".
        "action_needed": bool(row.action_needed),
        "action": row.action_needed or None,
        "count": row.count,
        "status": row.status,
        "created_at": isoformat(aware(row.created_at)),
        "updated_at": isoformat(aware(row.updated_at)),
        "acknowledged_by": row.acknowledged_by,
        "resolved_by": row.resolved_by,
    }


class AlertService:
    def __init__(
        self,
        store: Store,
        publish: Publish,
        clock: Clock = utc_now,
    ):
        self.store = store
        self.publish = publish
        self.clock = clock

    async def raise_alert(
        self,
        rule: str,
        severity: str,
        message: str,
        *,
        user_id: int | None = None,
        action: str = "",
        dedupe_day: str | None = None,
    ) -> dict[str, Any]:
        """Open an alert, or count a repeat of the live one for (rule, user, day)."""
        if severity not in SEVERITIES:
            raise ValueError(f"unknown severity {severity!r}")
        work = functools.partial(
            self._raise_sync, rule, severity, message, user_id, action, dedupe_day
        )
        return await commit(self.store, work, self.publish)

    async def acknowledge(self, alert_id: int, actor: str) -> dict[str, Any]:
        return await self._transition(alert_id, "acknowledged", actor)

    async def resolve(self, alert_id: int, actor: str) -> dict[str, Any]:
        return await self._transition(alert_id, "resolved", actor)

    async def end(
        self, rule: str, *, user_id: int | None = None, unless_day: str | None = None
    ) -> list[dict[str, Any]]:
        """Resolve the live alerts of ``rule`` whose condition has cleared, as ``system``.

        The rules decide when a condition has cleared (the alert engine); this resolves every
        open or acknowledged alert of ``rule`` (of ``user_id`` only, when given; except those
        of day ``unless_day``, for "a new day" endings) and publishes each change, so that a
        recurrence opens a new alert instead of counting on an old one forever.
        """
        work = functools.partial(self._end_sync, rule, user_id, unless_day)
        return await commit(self.store, work, self.publish)

    async def _transition(self, alert_id: int, status: str, actor: str) -> dict[str, Any]:
        work = functools.partial(self._transition_sync, alert_id, status, actor)
        return await commit(self.store, work, self.publish)

    # -- database work -----------------------------------------------------------------
    def _raise_sync(
        self,
        rule: str,
        severity: str,
        message: str,
        user_id: int | None,
        action: str,
        dedupe_day: str | None,
    ) -> Change[dict]:
        now = self.clock()
        day = dedupe_day or now.date().isoformat()
        key = f"{rule}:{user_id if user_id is not None else '-'}:{day}"
        stamp = naive_utc(now)
        with self.store.db.atomic():
            Alert.insert(
                rule=rule,
                severity=severity,
                user=user_id,
                message=message,
                action_needed=action,
                count=1,
                status="open",
                dedupe_key=key,
                created_at=stamp,
                updated_at=stamp,
            ).on_conflict(
                conflict_target=[Alert.dedupe_key],
                update={
                    Alert.count: Alert.count + 1,
                    Alert.message: message,
                    Alert.severity: severity,
                    Alert.updated_at: stamp,
                },
            ).execute()
            row = Alert.get(Alert.dedupe_key == key)
            username = User.get_by_id(user_id).username if user_id is not None else None
            payload = alert_json(row, username)
            payload["update"] = row.count > 1
            return Change(payload, [append_event("alert", payload, now)])

    def _transition_sync(self, alert_id: int, status: str, actor: str) -> Change[dict]:
        now = self.clock()
        with self.store.db.atomic():
            row = Alert.get_or_none(Alert.id == alert_id)
            if row is None:
                raise AlertNotFound()
            if row.status == "resolved" or row.status == status:
                # Idempotent: nothing changes, nothing is published.
                return Change(alert_json(row))
            payload, message = self._apply(row, status, actor, now)
            return Change(payload, [message])

    def _end_sync(
        self, rule: str, user_id: int | None, unless_day: str | None
    ) -> Change[list[dict]]:
        now = self.clock()
        live = (Alert.rule == rule) & Alert.dedupe_key.is_null(False)  # NULL once resolved
        if user_id is not None:
            live &= Alert.user == user_id
        with self.store.db.atomic():
            rows = [
                row
                for row in Alert.select().where(live).order_by(Alert.id)
                if unless_day is None or not row.dedupe_key.endswith(f":{unless_day}")
            ]
            changed = [self._apply(row, "resolved", "system", now) for row in rows]
        return Change([payload for payload, _ in changed], [message for _, message in changed])

    def _apply(self, row: Alert, status: str, actor: str, now: datetime) -> tuple[dict, Message]:
        """Move ``row`` to ``status``, audited; the payload and its event (in a transaction)."""
        row.status = status
        row.updated_at = naive_utc(now)
        if status == "acknowledged":
            row.acknowledged_by, row.acknowledged_at = actor, naive_utc(now)
        else:
            row.resolved_by, row.resolved_at = actor, naive_utc(now)
            row.dedupe_key = None  # a later repeat opens a new alert
        row.save()
        action = "alert.acknowledge" if status == "acknowledged" else "alert.resolve"
        record_audit(actor, action, f"alert:{row.id}", {"status": status}, now)
        payload = alert_json(row)
        payload["update"] = True
        return payload, append_event("alert", payload, now)
