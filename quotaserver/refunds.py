"""Refunds: give back the count of a keyed consume whose command never ran.

A refund names the consume by its ``Idempotency-Key`` (per token, like the consume), so it
gives back exactly what that consume counted, once: the answer is stored on the key's row in
the refund's transaction, and a second refund gets it again and changes nothing. Only the
windows that are still open are given back (a closed window's count is history), and never
below zero (an admin reset may have come first). The refund, its audit row and its
``quota_change`` event commit together; the event is published after the COMMIT.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .audit import record_audit
from .change import Change, Publish, commit
from .errors import DomainError
from .events import append_event
from .models import Usage
from .standings import recompute

if TYPE_CHECKING:
    from .quota import QuotaService


class UnknownConsume(DomainError, LookupError):
    status = 404
    code = "unknown_consume"
    default_message = (
        "no consume was counted with this Idempotency-Key for this user and command type"
    )


@dataclass(slots=True)
class Refund:
    response: str  # the JSON answer, byte for byte the same on a repeat
    replayed: bool


class RefundService:
    def __init__(self, quota: QuotaService, publish: Publish):
        self.quota = quota
        self.publish = publish
        usage = Usage._meta.table_name
        p = quota.db.param
        self.sql_give_back = (
            f'UPDATE "{usage}" SET "used" = CASE WHEN "used" > {p} THEN "used" - {p} ELSE 0 END '
            f'WHERE "user_id" = {p} AND "command_type" = {p} AND "period" = {p} '
            f'AND "window_start" = {p}'
        )

    async def refund(
        self, owner: str, user: str, command_type: str, key: str, actor: str
    ) -> Refund:
        """Give back the consume ``owner`` made with ``key``; UnknownConsume if none counted."""
        self.quota.validate_command_type(command_type)
        return await commit(
            self.quota.store, lambda: self._refund_sync(owner, user, command_type, key, actor),
            self.publish,
        )  # fmt: skip

    def _refund_sync(
        self, owner: str, user: str, command_type: str, key: str, actor: str
    ) -> Change[Refund]:
        quota, db = self.quota, self.quota.db
        now = quota.clock()
        with nullcontext() if db.in_transaction() else db.atomic():
            stored = quota.keys.find(owner, key, now)
            if (
                stored is None
                or stored.counted == 0
                or (stored.username, stored.command_type) != (user, command_type)
            ):
                raise UnknownConsume()
            if stored.refund is not None:
                return Change(Refund(stored.refund, replayed=True))
            windows = quota.calendar.windows(quota.periods, now)
            user_id = quota.sql.user_id(user)
            given: list[str] = []
            for period, window_key in stored.windows.items():
                if period in windows and windows[period].key == window_key:
                    n = stored.counted
                    db.execute_sql(
                        self.sql_give_back, (n, n, user_id, command_type, period, window_key)
                    )
                    given.append(period)
            closed = [p for p in stored.windows if p not in given]
            if "daily" in given:
                recompute([user_id], windows["daily"])
            limits = quota.limits_for(user_id, command_type)
            used = quota.sql.used(user_id, command_type, windows)
            statuses = quota.statuses(limits, used, windows)
            body: dict[str, Any] = {
                "user": user,
                "command_type": command_type,
                "key": key,
                "count": stored.counted,
                "refunded_periods": given,
                "closed_periods": closed,
                "periods": {p: s.to_json() for p, s in statuses.items()},
            }
            response = json.dumps(body, separators=(",", ":"))
            quota.keys.set_refund(stored.id, response)
            details = {"command_type": command_type, "count": stored.counted, "periods": given}
            record_audit(actor, "usage.refund", f"user:{user}", {**details, "key": key}, now)
            payload = {
                "action": "usage_refund",
                "scope": "user",
                "username": user,
                "user_id": user_id,
                **details,
                "actor": actor,
            }
            return Change(Refund(response, False), [append_event("quota_change", payload, now)])
