"""Read queries behind the admin API: users with utilisation, violations, alerts, audit log,
recent events. Writes go through ``app.rules`` and ``app.alerts`` (audited and published).

Every list is read in one transaction together with the event-log head (``seq``), so a
page that reloads over REST and then resumes its stream from that ``seq`` neither misses
nor repeats an event. All database work runs on the store's reader threads.

Every list pages by **keyset**: a response carries ``next_cursor`` (the sort key of its last
row, encoded as :mod:`quotaserver.cursors` encodes the users list's) and the next request
passes it back as ``cursor``; a page then costs an index range, however deep it is, and a
row is returned exactly once even while rows are added or changed (a row whose sort key
changes moves; see docs/admin-api.md). ``page`` offsets still work for short jumps.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from peewee import JOIN, Tuple, fn

from .alerts import alert_json
from .audit import audit_json
from .cursors import BadCursor, decode_cursor, encode_cursor
from .db import DatabaseUnavailable
from .events import last_seq
from .history import activity_per_bucket, violations_per_day
from .limits import Rules
from .models import (
    GLOBAL_SCOPE,
    Alert,
    AuditLog,
    Event,
    QuotaRule,
    Usage,
    User,
    Violation,
    aware,
    naive_utc,
)
from .read_gate import GateTimeout
from .standings import utilization
from .users_page import UsersPage
from .windows import isoformat

if TYPE_CHECKING:
    from .app import QuotaApp
    from .quota import QuotaService

# Utilisation risk levels, highest first: (name, percent at or above which it applies).
RISK_LEVELS = (("critical", 95.0), ("high", 90.0), ("elevated", 80.0))
USER_SORTS = ("username", "utilization", "violations", "refused")
MAX_ID = 2**62  # ids in cursors stay inside every database's integer range


@dataclass(frozen=True, slots=True)
class PageRequest:
    page: int = 1
    per_page: int = 50

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page

    def result(self, items: list, total: int, seq: int) -> dict[str, Any]:
        pages = max(1, -(-total // self.per_page))
        return {
            "items": items,
            "page": self.page,
            "per_page": self.per_page,
            "total": total,
            "pages": pages,
            "seq": seq,
        }


def after_id(cursor: str | None) -> int | None:
    """The id an ``{"id": n}`` cursor continues after (None without a cursor)."""
    if cursor is None:
        return None
    ident = decode_cursor(cursor, {"id": int})["id"]
    if not 0 < ident <= MAX_ID:
        raise BadCursor("cursor is not valid")
    return ident


def newest_first(query: Any, id_field: Any, page: PageRequest, after: int | None) -> tuple:
    """One page of ``query`` by descending id, after the cursor's id or at the page's offset;
    and the cursor of the next page (None on the last)."""
    query = query.order_by(id_field.desc())
    query = query.where(id_field < after) if after is not None else query.offset(page.offset)
    rows = list(query.limit(page.per_page + 1))
    more = len(rows) > page.per_page
    rows = rows[: page.per_page]
    return rows, encode_cursor({"id": rows[-1].id}) if more else None


def risk(percent: float | None) -> str | None:
    if percent is None:
        return None
    return next((name for name, floor in RISK_LEVELS if percent >= floor), None)


class AdminQueries:
    """Read-side of the admin API for one application."""

    def __init__(self, app: QuotaApp):
        self.app = app
        self.quota: QuotaService = app.quota
        self.store = app.store

    async def _read(self, fn: Any, *args: Any) -> Any:
        # One snapshot for the rows and the seq, on a reader (never the writer's queue),
        # one admin read at a time with a rest after it (quotaserver.read_gate).
        try:
            return await self.app.read_gate.run(
                lambda: self.store.read(fn, *args), wait=self.store.call_timeout
            )
        except GateTimeout:
            # Queued behind an admin read that did not finish: answer 503, do not pile up.
            raise DatabaseUnavailable("an earlier admin read did not finish; retry") from None

    # -- the charts --------------------------------------------------------------------
    async def activity(self, now: datetime, minutes: int, bucket: int) -> list[dict[str, Any]]:
        """Admitted, denied and refused per bucket (quotaserver.history)."""
        return await self._read(activity_per_bucket, now, minutes, bucket)

    async def violations_per_day(self, days: int) -> list[dict[str, Any]]:
        quota = self.quota
        return await self._read(violations_per_day, quota.calendar, quota.clock(), days)

    # -- users -------------------------------------------------------------------------
    async def users(
        self, search: str, sort: str, page: PageRequest, cursor: str | None = None
    ) -> dict[str, Any]:
        return await self._read(self._users_sync, search, sort, page, cursor)

    async def user_detail(self, username: str) -> dict[str, Any] | None:
        return await self._read(self._user_detail_sync, username)

    async def overrides(
        self, username: str | None, per_page: int = 200, cursor: str | None = None
    ) -> dict[str, Any]:
        after = None
        if cursor is not None:
            key = decode_cursor(cursor, {"s": str, "c": str, "p": str})
            after = (key["s"], key["c"], key["p"])
        return await self._read(self._overrides_sync, username, per_page, after)

    def _today(self) -> Any:
        return self.quota.calendar.window("daily", self.quota.clock())

    def _user_json(
        self, user: Any, used: dict[str, int], rules: Rules, violations: int, refused: int = 0
    ) -> dict:
        usage = {}
        percents = []
        for command_type in self.quota.command_types:
            n = used.get(command_type, 0)
            limit = rules.limit(user.id, command_type, "daily")
            percent = utilization(n, limit)
            if percent is not None:
                percents.append(percent)
            usage[command_type] = {
                "used": n,
                "limit": limit,
                "percent": percent,
                "overridden": rules.overridden(user.id, command_type, "daily"),
            }
        top = max(percents) if percents else None
        return {
            "user_id": user.id,
            "username": user.username,
            "created_at": isoformat(aware(user.created_at)),
            "usage": usage,
            "max_percent": top,
            "risk": risk(top),
            "violations_today": violations,
            "load_refusals_today": refused,
        }

    def _violations_today(self, user_ids: list[int], since: datetime) -> dict[int, int]:
        if not user_ids:
            return {}
        rows = (
            Violation.select(Violation.user, fn.COUNT(Violation.id).alias("n"))
            .where(Violation.user.in_(user_ids) & (Violation.created_at >= naive_utc(since)))
            .group_by(Violation.user)
        )
        return {row.user_id: row.n for row in rows}

    def _users_sync(
        self, search: str, sort: str, page: PageRequest, cursor: str | None
    ) -> dict[str, Any]:
        # Plain SQL and tuples (see quotaserver.users_page): the ORM's Python work per page
        # held the GIL long enough to slow consumes while admins paged.
        today = self._today()
        ranking = UsersPage(self.store.db, search, today.key)
        after = decode_cursor(cursor) if cursor else None
        total = None
        if sort in ("violations", "refused"):
            if cursor:
                raise BadCursor(f"the {sort} order pages by page number only")
            if sort == "violations":
                users, total = ranking.by_violations(page, today.start)
            else:
                users, total = ranking.by_refused(page)
            last = None
        elif sort == "utilization":
            users, last = ranking.by_utilization(page, after)
        else:
            users, last = ranking.by_name(page, after)
        ids = [u.id for u in users]
        rules = ranking.rules(ids)
        used = ranking.daily_usage(ids)
        violations = ranking.violations_today(ids, today.start)
        refused = ranking.load_refusals_today(ids)
        items = [self._user_json(u, used.get(u.id, {}), rules, violations.get(u.id, 0),
                                 refused.get(u.id, 0))
                 for u in users]  # fmt: skip
        result = page.result(items, ranking.total() if total is None else total, ranking.seq())
        result["next_cursor"] = encode_cursor(last) if last is not None else None
        # The thresholds behind each row's "risk", for a client that updates rows live.
        result["risk_levels"] = [[name, floor] for name, floor in RISK_LEVELS]
        return result

    def _user_detail_sync(self, username: str) -> dict[str, Any] | None:
        user = User.get_or_none(User.username == username)
        if user is None:
            return None
        now = self.quota.clock()
        windows = self.quota.calendar.windows(self.quota.periods, now)
        rules = Rules([user.id])
        rows = Usage.select().where(Usage.user == user.id)
        used = {
            (r.command_type, r.period): r.used
            for r in rows
            if r.period in windows and windows[r.period].key == r.window_start
        }
        limits = {}
        for command_type in self.quota.command_types:
            limits[command_type] = {}
            for period, window in windows.items():
                limit = rules.limit(user.id, command_type, period)
                n = used.get((command_type, period), 0)
                limits[command_type][period] = {
                    "limit": limit,
                    "used": n,
                    "remaining": None if limit is None else max(limit - n, 0),
                    "percent": utilization(n, limit),
                    "overridden": rules.overridden(user.id, command_type, period),
                    "default": rules.defaults.get(command_type, {}).get(period),
                    "resets_at": isoformat(window.end),
                }
        today = windows.get("daily") or self.quota.calendar.window("daily", now)
        recent = (
            Violation.select()
            .where(Violation.user == user.id)
            .order_by(Violation.id.desc())
            .limit(20)
        )
        alerts = (
            Alert.select()
            .where((Alert.user == user.id) & (Alert.status != "resolved"))
            .order_by(Alert.id.desc())
        )
        daily = self._user_json(
            user,
            {c: used.get((c, "daily"), 0) for c in self.quota.command_types},
            rules,
            self._violations_today([user.id], today.start).get(user.id, 0),
            UsersPage(self.store.db, "", today.key).load_refusals_today([user.id]).get(user.id, 0),
        )
        return {
            **daily,
            "periods": list(self.quota.periods),
            "limits": limits,
            "recent_violations": [violation_json(v, user.username) for v in recent],
            "open_alerts": [alert_json(a, user.username) for a in alerts],
            "seq": last_seq(),
        }

    def _overrides_sync(
        self, username: str | None, per_page: int, after: tuple[str, str, str] | None
    ) -> dict[str, Any]:
        # By (scope, command type, period): the rules' unique index, so a page is a range.
        key = (QuotaRule.scope, QuotaRule.command_type, QuotaRule.period)
        query = (
            QuotaRule.select(QuotaRule, User.id, User.username)
            .join(User, on=(QuotaRule.user == User.id))
            .where(QuotaRule.scope > GLOBAL_SCOPE)
            .order_by(*key)
        )
        if username is not None:
            query = query.where(User.username == username)
        if after is not None:
            query = query.where(Tuple(*key) > after)
        rows = list(query.limit(per_page + 1))
        last = rows[per_page - 1] if len(rows) > per_page else None
        items = [
            {
                "username": row.user.username,
                "user_id": row.user_id,
                "command_type": row.command_type,
                "period": row.period,
                "limit": row.limit,
                "updated_at": isoformat(aware(row.updated_at)),
            }
            for row in rows[:per_page]
        ]
        cursor = None
        if last is not None:
            cursor = encode_cursor({"s": last.scope, "c": last.command_type, "p": last.period})
        return {"items": items, "next_cursor": cursor, "seq": last_seq()}

    # -- violations, alerts, audit, events ---------------------------------------------
    async def violations(
        self,
        page: PageRequest,
        user: str | None = None,
        command_type: str | None = None,
        since: datetime | None = None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        after = after_id(cursor)
        return await self._read(self._violations_sync, page, user, command_type, since, after)

    def _violations_sync(
        self,
        page: PageRequest,
        user: str | None,
        command_type: str | None,
        since: Any,
        after: int | None,
    ) -> dict[str, Any]:
        query = Violation.select(Violation, User.id, User.username).join(User)
        if user is not None:
            query = query.where(User.username == user)
        if command_type is not None:
            query = query.where(Violation.command_type == command_type)
        if since is not None:
            query = query.where(Violation.created_at >= naive_utc(since))
        total = query.count()
        rows, cursor = newest_first(query, Violation.id, page, after)
        items = [violation_json(row, row.user.username) for row in rows]
        return {**page.result(items, total, last_seq()), "next_cursor": cursor}

    async def alerts(
        self,
        page: PageRequest,
        statuses: list[str] | None,
        severity: str | None,
        cursor: str | None = None,
        user: str | None = None,
    ) -> dict[str, Any]:
        after = None
        if cursor is not None:
            key = decode_cursor(cursor, {"u": str, "id": int})
            try:
                at = datetime.fromisoformat(key["u"])
            except ValueError:
                raise BadCursor("cursor is not valid") from None
            if at.tzinfo is not None or not 0 < key["id"] <= MAX_ID:
                raise BadCursor("cursor is not valid")
            after = (at, key["id"])
        return await self._read(self._alerts_sync, page, statuses, severity, after, user)

    def _alerts_sync(
        self,
        page: PageRequest,
        statuses: list[str] | None,
        severity: str | None,
        after: tuple[datetime, int] | None,
        user: str | None = None,
    ) -> dict[str, Any]:
        query = Alert.select(Alert, User.id, User.username).join(
            User, JOIN.LEFT_OUTER, on=(Alert.user == User.id)
        )
        if user is not None:
            query = query.where(User.username == user)
        if statuses is not None:
            query = query.where(Alert.status.in_(statuses))
        if severity is not None:
            query = query.where(Alert.severity == severity)
        total = query.count()
        counts = {
            row.status: row.n
            for row in Alert.select(Alert.status, fn.COUNT(Alert.id).alias("n")).group_by(
                Alert.status
            )
        }
        # Most recently changed first: an alert that changes while a client pages moves to
        # the top (the stream tells the client: an ``alert`` event).
        query = query.order_by(Alert.updated_at.desc(), Alert.id.desc())
        if after is not None:
            at, ident = after
            query = query.where(
                (Alert.updated_at < at) | ((Alert.updated_at == at) & (Alert.id < ident))
            )
        else:
            query = query.offset(page.offset)
        rows = list(query.limit(page.per_page + 1))
        last = rows[page.per_page - 1] if len(rows) > page.per_page else None
        rows = rows[: page.per_page]
        items = [alert_json(row, row.user.username if row.user_id else None) for row in rows]
        result = page.result(items, total, last_seq())
        result["next_cursor"] = (
            encode_cursor({"u": last.updated_at.isoformat(), "id": last.id}) if last else None
        )
        result["counts"] = {s: counts.get(s, 0) for s in ("open", "acknowledged", "resolved")}
        return result

    async def audit(
        self,
        page: PageRequest,
        action: str | None,
        actor: str | None,
        cursor: str | None = None,
        user: str | None = None,
    ) -> dict[str, Any]:
        after = after_id(cursor)
        return await self._read(self._audit_sync, page, action, actor, after, user)

    def user_targets(self, username: str) -> list[str]:
        """Every audit target that names the user: its usage, and its rules of each type
        (exact strings, so the filter is an index-free IN list, never a LIKE on names that
        may contain ``%`` or ``_``)."""
        rules = [f"rule:{c}:user:{username}" for c in self.quota.command_types]
        return [f"user:{username}", *rules]

    def _audit_sync(
        self,
        page: PageRequest,
        action: str | None,
        actor: str | None,
        after: int | None,
        user: str | None = None,
    ) -> dict:
        query = AuditLog.select()
        if action is not None:
            query = query.where(AuditLog.action == action)
        if actor is not None:
            query = query.where(AuditLog.actor == actor)
        if user is not None:
            query = query.where(AuditLog.target.in_(self.user_targets(user)))
        total = query.count()
        rows, cursor = newest_first(query, AuditLog.id, page, after)
        return {**page.result([audit_json(r) for r in rows], total, last_seq()),
                "next_cursor": cursor}  # fmt: skip

    async def events(
        self,
        types: frozenset[str] | None,
        limit: int,
        before: int | None,
        cursor: str | None = None,
    ) -> dict[str, Any]:
        """Newest first; ``cursor`` (or the older ``before`` seq) continues a listing."""
        after = after_id(cursor)
        if after is not None:
            before = after if before is None else min(before, after)
        return await self._read(self._events_sync, types, limit, before)

    def _events_sync(self, types: frozenset[str] | None, limit: int, before: int | None) -> dict:
        query = Event.select()
        if types is not None:
            query = query.where(Event.type.in_(sorted(types)))
        if before is not None:
            query = query.where(Event.id < before)
        rows = list(query.order_by(Event.id.desc()).limit(limit + 1))
        more = len(rows) > limit
        rows = rows[:limit]
        items = [
            {
                "type": r.type,
                "seq": r.id,
                "timestamp": isoformat(aware(r.created_at)),
                "data": json.loads(r.data),
            }
            for r in rows
        ]
        cursor = encode_cursor({"id": rows[-1].id}) if more else None
        return {"items": items, "next_cursor": cursor, "seq": last_seq()}


def violation_json(row: Violation, username: str) -> dict[str, Any]:
    return {
        "id": row.id,
        "user_id": row.user_id,
        "username": username,
        "command_type": row.command_type,
        "period": row.period,
        "limit": row.limit,
        "attempted": row.attempted,
        "message": row.message,
        "created_at": isoformat(aware(row.created_at)),
    }
