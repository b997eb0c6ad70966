"""RuleService: admin changes to limits and usage. Each change is audited and published.

A change, its audit row and its ``quota_change`` event commit in one transaction; the
event is published after the commit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

from peewee import JOIN

from .audit import record_audit
from .change import Change, Publish, commit
from .errors import DomainError
from .events import append_event
from .limits import whole_number
from .models import GLOBAL_SCOPE, QuotaRule, Usage, User, naive_utc
from .quota import QuotaError, QuotaService
from .standings import recompute, users_with_usage

Limits = dict[str, int | None]


class UnknownUser(DomainError, LookupError):
    status = 404
    code = "unknown_user"
    default_message = "no such user"


class RuleService:
    def __init__(self, quota: QuotaService, publish: Publish):
        self.quota = quota
        self.store = quota.store
        self.publish = publish

    # -- validation ----------------------------------------------------------------------
    def validate_limits(self, limits: Any, allow_empty: bool = False) -> Limits:
        """``{period: non-negative int or None}`` over tracked periods; QuotaError otherwise."""
        if not isinstance(limits, dict) or (not limits and not allow_empty):
            raise QuotaError("invalid_field", "limits must be a non-empty object")
        out: Limits = {}
        for period, value in limits.items():
            value = whole_number(value)
            if period not in self.quota.periods:
                raise QuotaError("invalid_field", f"unknown or untracked period {period!r}")
            if value is not None and (
                not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 10**12
            ):
                raise QuotaError(
                    "invalid_field", f"limits.{period} must be a non-negative integer or null"
                )
            out[period] = value
        return out

    # -- reads -----------------------------------------------------------------------------
    async def list_rules(self) -> dict[str, Any]:
        return await self.store.read(self._list_sync)

    def _list_sync(self) -> dict[str, Any]:
        defaults: dict[str, Limits] = {c: {} for c in self.quota.command_types}
        overrides: dict[str, dict[str, Limits]] = {}
        query = QuotaRule.select(QuotaRule, User.username).join(
            User, on=(QuotaRule.user == User.id), join_type=JOIN.LEFT_OUTER
        )
        for row in query.objects():
            if row.scope == GLOBAL_SCOPE:
                defaults.setdefault(row.command_type, {})[row.period] = row.limit
            else:
                user = overrides.setdefault(row.username, {})
                user.setdefault(row.command_type, {})[row.period] = row.limit
        return {"periods": list(self.quota.periods), "defaults": defaults, "overrides": overrides}

    # -- writes ----------------------------------------------------------------------------
    async def set_global_limits(self, command_type: str, limits: Any, actor: str) -> dict:
        """Set (or, with None, make unlimited) the global default of some periods."""
        self.quota.validate_command_type(command_type)
        limits = self.validate_limits(limits)
        return await self._apply(self._set_sync, None, command_type, limits, actor)

    async def set_user_limits(
        self, username: str, command_type: str, limits: Any, actor: str
    ) -> dict:
        """Override some periods for one user (created if new). None means unlimited."""
        self.quota.validate_command_type(command_type)
        limits = self.validate_limits(limits)
        return await self._apply(self._set_sync, username, command_type, limits, actor)

    async def remove_user_override(
        self, username: str, command_type: str, periods: list[str] | None, actor: str
    ) -> dict:
        """Drop a user's overrides (all periods, or some) so the defaults apply again."""
        self.quota.validate_command_type(command_type)
        if periods is not None:
            self.validate_limits(dict.fromkeys(periods), allow_empty=True)
        return await self._apply(self._remove_sync, username, command_type, periods, actor)

    async def reset_usage(self, username: str, command_type: str | None, actor: str) -> dict:
        """Zero a user's counters in the current windows (one command type or all)."""
        if command_type is not None:
            self.quota.validate_command_type(command_type)
        return await self._apply(self._reset_sync, username, command_type, actor)

    async def _apply(self, fn: Callable[..., Change[dict]], *args: Any) -> dict:
        return await commit(self.store, functools.partial(fn, *args), self.publish)

    def _user(self, username: str, create: bool) -> User:
        row = User.get_or_none(User.username == username)
        if row is None:
            if not create:
                raise UnknownUser()
            self.quota.ensure_user(username, self.quota.clock())
            row = User.get(User.username == username)
        return row

    def _set_sync(
        self, username: str | None, command_type: str, limits: Limits, actor: str
    ) -> Change[dict]:
        now = self.quota.clock()
        with self.store.db.atomic():
            user = self._user(username, create=True) if username is not None else None
            scope = GLOBAL_SCOPE if user is None else str(user.id)
            before = self.quota.limits_for(user.id if user else None, command_type)
            for period, limit in limits.items():
                QuotaRule.insert(
                    scope=scope,
                    user=user.id if user else None,
                    command_type=command_type,
                    period=period,
                    limit=limit,
                    updated_at=naive_utc(now),
                ).on_conflict(
                    conflict_target=[QuotaRule.scope, QuotaRule.command_type, QuotaRule.period],
                    update={QuotaRule.limit: limit, QuotaRule.updated_at: naive_utc(now)},
                ).execute()
            if "daily" in limits:  # utilisation depends on the daily limit only
                today = self.quota.calendar.window("daily", now)
                affected = [user.id] if user else users_with_usage(command_type, today)
                recompute(affected, today)
            payload = {
                "action": "limits_updated",
                "scope": "global" if user is None else "user",
                "username": username,
                "user_id": user.id if user else None,
                "command_type": command_type,
                "limits": limits,
                "effective": self.quota.limits_for(user.id if user else None, command_type),
                "actor": actor,
            }
            target = f"rule:{command_type}" + (f":user:{username}" if username else ":global")
            details = {"limits": limits, **_before_after(before, payload["effective"], limits)}
            payload["before"] = details["before"]
            record_audit(actor, "limits.update", target, details, now)
            return Change(payload, [append_event("quota_change", payload, now)])

    def _remove_sync(
        self, username: str, command_type: str, periods: list[str] | None, actor: str
    ) -> Change[dict]:
        now = self.quota.clock()
        with self.store.db.atomic():
            user = self._user(username, create=False)
            before = self.quota.limits_for(user.id, command_type)
            query = QuotaRule.delete().where(
                (QuotaRule.scope == str(user.id)) & (QuotaRule.command_type == command_type)
            )
            if periods is not None:
                query = query.where(QuotaRule.period.in_(periods))
            removed = query.execute()
            if periods is None or "daily" in periods:
                recompute([user.id], self.quota.calendar.window("daily", now))
            payload = {
                "action": "override_removed",
                "scope": "user",
                "username": username,
                "user_id": user.id,
                "command_type": command_type,
                "periods": periods,
                "removed": removed,
                "effective": self.quota.limits_for(user.id, command_type),
                "actor": actor,
            }
            record_audit(
                actor,
                "limits.remove_override",
                f"rule:{command_type}:user:{username}",
                {
                    "periods": periods,
                    **_before_after(before, payload["effective"], periods or self.quota.periods),
                },
                now,
            )
            return Change(payload, [append_event("quota_change", payload, now)])

    def _reset_sync(self, username: str, command_type: str | None, actor: str) -> Change[dict]:
        now = self.quota.clock()
        windows = self.quota.calendar.windows(self.quota.periods, now)
        with self.store.db.atomic():
            user = self._user(username, create=False)
            reset = 0
            for period, window in windows.items():
                query = Usage.update(used=0).where(
                    (Usage.user == user.id)
                    & (Usage.period == period)
                    & (Usage.window_start == window.key)
                )
                if command_type is not None:
                    query = query.where(Usage.command_type == command_type)
                reset += query.execute()
            recompute([user.id], self.quota.calendar.window("daily", now))
            payload = {
                "action": "usage_reset",
                "scope": "user",
                "username": username,
                "user_id": user.id,
                "command_type": command_type,
                "counters_reset": reset,
                "actor": actor,
            }
            record_audit(
                actor,
                "usage.reset",
                f"user:{username}",
                {"command_type": command_type, "counters_reset": reset},
                now,
            )
            return Change(payload, [append_event("quota_change", payload, now)])


def _before_after(before: Limits, after: Limits, periods: Iterable[str]) -> dict[str, Limits]:
    """The effective limits of the changed periods before and after a change, for the audit
    log: "limit 800 -> 800800" must be readable there, not only the new value."""
    return {
        "before": {p: before.get(p) for p in periods},
        "after": {p: after.get(p) for p in periods},
    }
