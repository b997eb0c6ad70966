"""QuotaService: check and consume against every window, exactly, with atomic SQL.

A consume runs in one transaction: make sure the user and its window counters exist, then
``UPDATE usage SET used = used + n WHERE ... AND used + n <= limit`` for each window inside
a savepoint. If any window refuses, the savepoint rolls back (no counter changes) and the
violation and its event row are written in the same outer transaction. A consume with an
``Idempotency-Key`` writes the key's row with its answer in that same transaction
(quotaserver.idempotency), so a retry finds the answer exactly when the count exists.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from peewee import Database

from .activity import ActivityBuffer
from .change import Change, commit
from .config import PERIODS, Config
from .counters import CounterSQL, peak_rank
from .db import Store
from .errors import DomainError
from .events import append_event
from .idempotency import InFlight, KeySQL, KeyTaken, Replay, RequestKey, replay
from .models import (
    GLOBAL_SCOPE,
    QuotaRule,
    User,
    Violation,
    aware,
    naive_utc,
)
from .realtime.messages import Message
from .standings import utilization
from .throttle import SystemLoad
from .windows import Clock, Window, WindowCalendar, isoformat, utc_now

log = logging.getLogger(__name__)


class QuotaError(DomainError, ValueError):
    """Bad input to the quota service (400); ``code`` is the API error code."""

    def __init__(self, code: str, message: str, status: int | None = None):
        super().__init__(message, code=code, status=status)


class UnknownCommandType(QuotaError):
    """A command type the server does not track: ``quotas.unknown_command_status``."""

    def __init__(self, command_type: str, status: int = 400):
        super().__init__(
            "unknown_command_type", f"unknown command type {command_type!r}", status=status
        )


@dataclass(slots=True)
class PeriodStatus:
    limit: int | None
    used: int
    resets_at: datetime
    resets_text: str | None = None  # resets_at as isoformat() gives it, if known
    seconds: int = 0  # the window's length (RateLimit-Policy's w)

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else max(self.limit - self.used, 0)

    def to_json(self) -> dict[str, Any]:
        return {
            "limit": self.limit,
            "used": self.used,
            "remaining": self.remaining,
            "resets_at": self.resets_text or isoformat(self.resets_at),
        }


@dataclass(slots=True)
class Decision:
    allowed: bool
    user: str
    user_id: int | None
    command_type: str
    count: int
    throttle_factor: float
    periods: dict[str, PeriodStatus]
    consumed: bool = False  # True when counters were incremented
    reason: str | None = None  # "quota_exceeded" | "system_overloaded"
    violation: dict[str, Any] | None = None
    events: list[Message] = field(default_factory=list)
    at: datetime = field(default_factory=utc_now)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "allowed": self.allowed,
            "user": self.user,
            "command_type": self.command_type,
            "count": self.count,
            "throttle_factor": self.throttle_factor,
            "periods": {p: s.to_json() for p, s in self.periods.items()},
        }
        if self.reason:
            body["reason"] = self.reason
        if self.violation:
            body["violation"] = {
                k: self.violation[k] for k in ("period", "limit", "attempted", "message")
            }
        return body

    @property
    def status(self) -> int:
        """The HTTP status of this answer: 200 admitted, 429 over quota, 503 shed."""
        if self.allowed:
            return 200
        return 503 if self.reason == "system_overloaded" else 429


@dataclass(frozen=True, slots=True)
class BatchItem:
    """One decision of a batch (validated), with its own Idempotency-Key if it has one."""

    user: str
    command_type: str
    count: int = 1
    key: RequestKey | None = None


#: A batch item's outcome: decided now, the stored answer of its key, or its key's refusal.
BatchResult = Decision | Replay | DomainError


def _replayed(stored: Any, key: RequestKey, now: datetime) -> Replay | DomainError:
    try:
        return replay(stored, key, now)
    except DomainError as exc:  # reused with another body (422), or vanished (409)
        return exc


def tightest_of(limited: list[tuple[str, PeriodStatus]]) -> tuple[str, PeriodStatus]:
    """Of a non-empty list of limited windows, the one with the least remaining (the one a
    client should watch), the sooner reset first on a tie."""
    return min(limited, key=lambda ps: (ps[1].remaining, ps[1].resets_at))


def first_exhausted(
    periods: tuple[str, ...], limits: dict[str, int | None], used: dict[str, int], count: int
) -> str | None:
    """The first window (shortest first) that ``count`` more would take past its limit."""
    return next((p for p in periods if limits[p] is not None and used[p] + count > limits[p]), None)


class QuotaService:
    """The in-process quota API used by HTTP handlers and plugins."""

    def __init__(
        self,
        config: Config,
        store: Store,
        load: SystemLoad,
        clock: Clock = utc_now,
        publish: Callable[[list[Message]], None] | None = None,
        on_decision: Callable[[Decision], None] | None = None,
        on_decisions: Callable[[list[Decision]], None] | None = None,
    ):
        self.store = store
        self.load = load
        self.clock = clock
        self.publish = publish or (lambda msgs: None)
        self.on_decision = on_decision or (lambda d: None)
        #: A batch's decisions at once (default: ``on_decision`` for each).
        self.on_decisions = on_decisions or self._each_decided
        self.command_types: tuple[str, ...] = tuple(config["quotas.command_types"])
        # Shortest window first: a multi-window denial reports the first exhausted one.
        self.periods = tuple(p for p in PERIODS if p in config["quotas.periods"])
        self.calendar = WindowCalendar(config["quotas.timezone"], config["quotas.week_start"])
        self.defaults: dict[str, dict[str, int | None]] = config["quotas.defaults"]
        self.sql = CounterSQL(store.db)
        self.keys = KeySQL(store.db)
        self._peak_in_upsert = self.sql.peak_in_upsert and "daily" in self.periods
        #: PostgreSQL: admitted commands per minute summed in this process after COMMIT and
        #: flushed every ``ActivityBuffer.interval`` (one row per minute would otherwise be
        #: locked by every consume until its COMMIT). SQLite sums them per group commit.
        self.activity: ActivityBuffer | None = (
            None if store.is_sqlite else ActivityBuffer(store, self.sql.write_activity)
        )
        self.in_flight = InFlight()
        self.key_ttl: float = config["quotas.idempotency_ttl"]
        self.unknown_command_status: int = config["quotas.unknown_command_status"]

    @property
    def db(self) -> Database:
        return self.store.db

    # -- validation -------------------------------------------------------------------
    def validate_command_type(self, command_type: str) -> None:
        if command_type not in self.command_types:
            raise UnknownCommandType(command_type, self.unknown_command_status)

    # -- public API -------------------------------------------------------------------
    async def check(self, user: str, command_type: str, count: int = 1) -> Decision:
        """Would ``count`` commands be admitted now? No side effects."""
        self.validate_command_type(command_type)
        factor = self.load.factor
        decision = await self.store.run(self._check_sync, user, command_type, count, factor)
        return decision

    async def consume(
        self, user: str, command_type: str, count: int = 1, key: RequestKey | None = None
    ) -> Decision | Replay:
        """Admit and count ``count`` commands in every window, or deny and record why.

        With an idempotency ``key`` the answer is stored with the counters; a retry with the
        same key gets it back as a :class:`Replay` and counts nothing (see idempotency.py).
        """
        self.validate_command_type(command_type)
        if key is not None:
            return await self._consume_keyed(user, command_type, count, key)
        factor = self.load.factor
        overloaded = factor <= 0.0
        work = self._refuse_for_load_sync if overloaded else self._consume_sync

        def run() -> Change[Decision]:
            decision = work(user, command_type, count, factor)
            return Change(decision, decision.events)

        # Persist, then publish (quotaserver.change); the plugins' on_decision after that.
        return await commit(self.store, run, self.publish, self._committed)

    async def flush_activity(self, closing: bool = False) -> None:
        """Write the buffered per-minute activity now (before a read; at shutdown)."""
        if self.activity is not None:
            await (self.activity.close() if closing else self.activity.flush())

    def _each_decided(self, decisions: list[Decision]) -> None:
        for decision in decisions:
            self.on_decision(decision)

    def _committed(self, change: Change[Decision]) -> None:
        self._counted(change.payload)
        self.on_decision(change.payload)

    def _counted(self, decision: Decision) -> None:
        """After COMMIT: add an admitted consume to the buffered per-minute activity."""
        if self.activity is not None and decision.consumed:
            self.activity.add(int(decision.at.timestamp()) // 60 * 60, decision.count)

    async def _consume_keyed(
        self, user: str, command_type: str, count: int, key: RequestKey
    ) -> Decision | Replay:
        with self.in_flight.hold(key):
            factor = self.load.factor
            if factor <= 0.0:
                # Shedding load counts nothing and is not stored (a retry should be decided
                # afresh), but a key that already counted is still answered from its row.
                stored = await self.store.run(self.keys.find, key.owner, key.key, self.clock())
                if stored is not None:
                    return replay(stored, key, self.clock())
                return await self.consume(user, command_type, count)

            def run() -> Change[Decision]:
                decision = self._consume_sync(user, command_type, count, factor, key)
                return Change(decision, decision.events)

            try:
                return await commit(self.store, run, self.publish, self._committed)
            except KeyTaken:
                stored = await self.store.run(self.keys.find, key.owner, key.key, self.clock())
                return replay(stored, key, self.clock())

    async def user_status(self, user: str) -> dict[str, Any] | None:
        """Per command type and period: limit, used, remaining, resets_at; None if unknown."""
        return await self.store.read(self._user_status_sync, user)

    def seed_defaults(self, defaults: dict[str, dict[str, int | None]] | None = None) -> None:
        """Insert the configured global defaults (or ``defaults``, a reloaded file's) for
        command types that have no rule yet."""
        now = naive_utc(self.clock())
        with self.db.atomic():
            present = {
                r.command_type
                for r in QuotaRule.select(QuotaRule.command_type).where(
                    QuotaRule.scope == GLOBAL_SCOPE
                )
            }
            for command_type, limits in (self.defaults if defaults is None else defaults).items():
                if command_type in present:
                    continue
                for period, limit in limits.items():
                    QuotaRule.create(
                        scope=GLOBAL_SCOPE,
                        command_type=command_type,
                        period=period,
                        limit=limit,
                        updated_at=now,
                    )

    # -- database work (runs on a worker thread) --------------------------------------
    def limits_for(self, user_id: int | None, command_type: str) -> dict[str, int | None]:
        """Effective limits: the user's rule for a period beats the global one."""
        return self.sql.limits(user_id, command_type, self.periods)

    def statuses(self, limits: dict, used: dict, windows: dict[str, Window]) -> dict:
        """Each period's limit, use and reset, as answers show them (refunds use it too)."""
        return {
            p: PeriodStatus(
                limits[p], used[p], windows[p].end, windows[p].end_text, windows[p].seconds
            )
            for p in self.periods
        }

    def _check_sync(self, user: str, command_type: str, count: int, factor: float) -> Decision:
        now = self.clock()
        windows = self.calendar.windows(self.periods, now)
        user_id = self.sql.user_id(user)
        limits = self.limits_for(user_id, command_type)
        used = self.sql.used(user_id, command_type, windows)
        exhausted = first_exhausted(self.periods, limits, used, count)
        decision = Decision(
            allowed=exhausted is None and factor > 0.0,
            user=user,
            user_id=user_id,
            command_type=command_type,
            count=count,
            throttle_factor=factor,
            periods=self.statuses(limits, used, windows),
            at=now,
        )
        if factor <= 0.0:
            decision.reason = "system_overloaded"
        elif exhausted:
            decision.reason = "quota_exceeded"
            decision.violation = self._violation_fields(
                exhausted, limits[exhausted], used[exhausted] + count, command_type
            )
        return decision

    def _refuse_for_load_sync(
        self, user: str, command_type: str, count: int, factor: float
    ) -> Decision:
        """A consume refused because the throttle factor is 0: nothing is admitted, but the
        refusal is counted (per minute, and per known user today) so that the dashboard can
        show what load turned away; the counters of the windows stay as they were."""
        with nullcontext() if self.db.in_transaction() else self.db.atomic():
            decision = self._check_sync(user, command_type, count, factor)
            decision.allowed = False
            decision.reason = "system_overloaded"
            day = self.calendar.window("daily", decision.at).key
            minute = int(decision.at.timestamp()) // 60 * 60
            self.sql.bump_refused(minute, decision.user_id, day)
        return decision

    @staticmethod
    def _violation_fields(period: str, limit: int, attempted: int, command_type: str) -> dict:
        message = (
            f"{period.capitalize()} {command_type} quota exceeded: "
            f"{attempted} attempted, limit {limit}"
        )
        return {"period": period, "limit": limit, "attempted": attempted, "message": message}

    def ensure_user(self, username: str, now: datetime) -> int:
        """The user's id (created on first sight)."""
        return self.sql.ensure_user(username, now)

    def _consume_sync(
        self,
        user: str,
        command_type: str,
        count: int,
        factor: float,
        key: RequestKey | None = None,
    ) -> Decision:
        now = self.clock()
        windows = self.calendar.windows(self.periods, now)
        # Inside a group commit this unit already has its savepoint; alone, a transaction.
        with nullcontext() if self.db.in_transaction() else self.db.atomic():
            decision = self._decide(user, command_type, count, factor, now, windows)
            if key is not None:
                self._store_key(key, decision, windows, now)
            return decision

    def _store_key(
        self, key: RequestKey, decision: Decision, windows: dict[str, Window], now: datetime
    ) -> None:
        """In the counters' transaction: the key exists exactly when the effect does."""
        consumed = decision.consumed
        self.keys.store(
            key,
            decision.status,
            json.dumps(decision.to_json(), separators=(",", ":")),
            (decision.user, decision.command_type, decision.count if consumed else 0),
            {p: w.key for p, w in windows.items()} if consumed else {},
            now,
            self.key_ttl,
        )

    # -- batches ----------------------------------------------------------------------
    async def consume_batch(self, items: list[BatchItem]) -> list[BatchResult]:
        """Decide every item in one transaction, in order, each exactly as a single consume
        would (its own windows, violation, event and Idempotency-Key), and publish the
        violations after the COMMIT. Items are validated by the caller; an unknown command
        type refuses the whole batch before anything is written."""
        for item in items:
            self.validate_command_type(item.command_type)
        factor = self.load.factor

        def run() -> Change[list[BatchResult]]:
            now = self.clock()
            windows = self.calendar.windows(self.periods, now)
            with nullcontext() if self.db.in_transaction() else self.db.atomic():
                if factor > 0.0 and all(item.key is None for item in items):
                    results: list[BatchResult] = self._decide_many(items, factor, now, windows)
                else:
                    results = [self._batch_item(item, factor, now, windows) for item in items]
            events = [m for r in results if isinstance(r, Decision) for m in r.events]
            return Change(results, events)

        def decided(change: Change[list[BatchResult]]) -> None:
            decisions = [r for r in change.payload if isinstance(r, Decision)]
            for decision in decisions:
                self._counted(decision)
            self.on_decisions(decisions)

        return await commit(self.store, run, self.publish, decided)

    def _decide_many(
        self, items: list[BatchItem], factor: float, now: datetime, windows: dict[str, Window]
    ) -> list[Decision]:
        """Unkeyed items, admitted by load, set-wise: every user, rule and counter the batch
        touches read (counters locked) in three to four statements, each item decided in
        order in memory against the counters as the items before it left them (the single
        consume's rule, :func:`first_exhausted`), and the counters and daily peaks written
        back in one statement each. Refusals write their violation as a single one does."""
        sql = self.sql
        pairs = list(dict.fromkeys((item.user, item.command_type) for item in items))
        ids, limits = sql.users_and_limits_of(pairs, self.periods, now)
        counters = sql.lock_counters(sorted(limits), windows)
        changed: dict[tuple[int, str], dict[str, int]] = {}
        peaks: dict[int, tuple[float, str]] = {}
        admitted = 0
        decisions = []
        for item in items:
            user_id = ids[item.user]
            key = (user_id, item.command_type)
            own, used = limits[key], counters[key]
            exhausted = first_exhausted(self.periods, own, used, item.count)
            if exhausted is None:
                for period in used:
                    used[period] += item.count
                changed[key] = used
                admitted += item.count
            decision = Decision(
                allowed=exhausted is None,
                user=item.user,
                user_id=user_id,
                command_type=item.command_type,
                count=item.count,
                throttle_factor=factor,
                periods=self.statuses(own, used, windows),
                consumed=exhausted is None,
                at=now,
            )
            decisions.append(decision)
            if exhausted is None:
                daily = decision.periods.get("daily")
                if daily is not None:
                    rank = peak_rank(utilization(daily.used, daily.limit))
                    best = peaks.get(user_id)
                    if best is None or rank < best[0]:
                        peaks[user_id] = (rank, item.user)
                continue
            fields = self._violation_fields(
                exhausted, own[exhausted], used[exhausted] + item.count, item.command_type
            )
            decision.reason = "quota_exceeded"
            decision.violation, event = self._record_violation(
                user_id, item.user, item.command_type, fields, now
            )
            decision.events.append(event)
        sql.set_counters(changed, windows)
        if "daily" in windows:
            sql.raise_peaks(peaks, windows["daily"].key)
        if self.activity is None and admitted:  # SQLite: summed per group commit
            sql.bump_activity(int(now.timestamp()) // 60 * 60, commands=admitted)
        return decisions

    def _batch_item(
        self, item: BatchItem, factor: float, now: datetime, windows: dict[str, Window]
    ) -> BatchResult:
        key = item.key
        if key is not None:
            stored = self.keys.find(key.owner, key.key, now)
            if stored is not None:  # a retried item: its first answer, nothing counted
                return _replayed(stored, key, now)
        if factor <= 0.0:  # shedding load counts nothing and stores no key
            decision = self._check_sync(item.user, item.command_type, item.count, factor)
            decision.allowed, decision.reason = False, "system_overloaded"
            return decision
        if key is None:
            return self._decide(item.user, item.command_type, item.count, factor, now, windows)
        try:
            with self.db.atomic():  # a savepoint: a key taken meanwhile undoes this item only
                decision = self._decide(
                    item.user, item.command_type, item.count, factor, now, windows
                )
                self._store_key(key, decision, windows, now)
            return decision
        except KeyTaken:  # the same key earlier in this batch, or committed just now
            return _replayed(self.keys.find(key.owner, key.key, now), key, now)

    def _decide(
        self,
        user: str,
        command_type: str,
        count: int,
        factor: float,
        now: datetime,
        windows: dict[str, Window],
    ) -> Decision:
        """Count in every window or refuse (the caller holds the transaction)."""
        user_id, limits = self.sql.user_and_limits(user, command_type, self.periods, now)
        # All windows or none; a refusal leaves the counters as they were. PostgreSQL raises
        # the daily peak in the same statement.
        peak = (user, windows["daily"].key) if self._peak_in_upsert else None
        used, exhausted = self.sql.increment_all(
            user_id, command_type, windows, count, limits, peak
        )
        decision = Decision(
            allowed=exhausted is None,
            user=user,
            user_id=user_id,
            command_type=command_type,
            count=count,
            throttle_factor=factor,
            periods=self.statuses(limits, used, windows),
            consumed=exhausted is None,
            at=now,
        )
        if exhausted is None:
            daily = decision.periods.get("daily")
            if daily is not None and peak is None:
                percent = utilization(daily.used, daily.limit)
                self.sql.raise_peak(user_id, user, windows["daily"].key, percent)
            if self.activity is None:  # SQLite: summed per group commit, in this transaction
                self.sql.bump_activity(int(now.timestamp()) // 60 * 60, commands=count)
            return decision
        fields = self._violation_fields(
            exhausted, limits[exhausted], used[exhausted] + count, command_type
        )
        decision.reason = "quota_exceeded"
        decision.violation, event = self._record_violation(user_id, user, command_type, fields, now)
        decision.events.append(event)
        return decision

    def _record_violation(
        self, user_id: int, user: str, command_type: str, fields: dict, now: datetime
    ) -> tuple[dict[str, Any], Message]:
        """Write the violation, its event and the per-minute count (inside a transaction)."""
        Violation.create(
            user=user_id, command_type=command_type, created_at=naive_utc(now), **fields
        )
        payload = {"user_id": user_id, "username": user, "command_type": command_type}
        payload.update(fields)
        self.sql.bump_activity(int(now.timestamp()) // 60 * 60, violations=1)
        return payload, append_event("violation", payload, now)

    async def record_violation(self, user: str, command_type: str, period: str) -> dict:
        """Record a violation of ``period`` as if one more command had been attempted.

        For the development endpoints: it takes the same storage and publishing path as a
        denied consume.
        """
        self.validate_command_type(command_type)

        def work() -> Change[dict]:
            now = self.clock()
            window = self.calendar.window(period, now)
            with self.db.atomic():
                user_id = self.ensure_user(user, now)
                limit = self.limits_for(user_id, command_type).get(period) or 0
                used = self.sql.used(user_id, command_type, {period: window})[period]
                fields = self._violation_fields(period, limit, used + 1, command_type)
                payload, event = self._record_violation(user_id, user, command_type, fields, now)
                return Change(payload, [event])

        return await commit(self.store, work, self.publish)

    def _user_status_sync(self, user: str) -> dict[str, Any] | None:
        row = User.select().where(User.username == user).first()
        if row is None:
            return None
        now = self.clock()
        windows = self.calendar.windows(self.periods, now)
        commands = {}
        for command_type in self.command_types:
            limits = self.limits_for(row.id, command_type)
            used = self.sql.used(row.id, command_type, windows)
            statuses = self.statuses(limits, used, windows)
            commands[command_type] = {p: s.to_json() for p, s in statuses.items()}
        return {
            "user": row.username,
            "user_id": row.id,
            "created_at": isoformat(aware(row.created_at)),
            "throttle_factor": self.load.factor,
            "command_types": commands,
        }
