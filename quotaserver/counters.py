"""The consume hot path as precompiled, portable SQL.

Building SQL through the ORM cost about four times more CPU than running it (profiled:
~6 ms of query building per consume against ~1 ms in SQLite). These statements are built
once per database, run with parameters (so the driver's statement cache applies), and use
only syntax SQLite (3.35+) and PostgreSQL share: ``ON CONFLICT ... DO NOTHING / DO UPDATE``,
``RETURNING`` and double-quoted identifiers.

An admitted consume is three statements, whether the user and its counters exist or not:
the user's id and limits in one ``SELECT``, one conditional upsert of every window's counter
(``INSERT ... ON CONFLICT DO UPDATE ... WHERE used + n <= limit RETURNING``), and the daily
peak (on PostgreSQL the upsert and the peak are one statement). A first-sight user adds one
``INSERT``; a refusal adds one ``UPDATE`` per window that took the count (taken back in the
same transaction) and a read of the counters. The per-minute activity is summed per group
commit (:func:`db.add_to_commit`) and written once per transaction on SQLite; on PostgreSQL
admitted commands are summed per process and flushed (quotaserver.activity) and a
violation's count is one more statement.

A batch of unkeyed decisions is set-wise instead: the users' ids, their rules and every
counter the batch touches are read (the counters created where missing and, on PostgreSQL,
locked) in three or four statements, the items are decided in memory in order, and the
counters and daily peaks are written back in one statement each: six round trips on
PostgreSQL for 10 decisions as for 500, against three per decision.
"""

from __future__ import annotations

from datetime import datetime

from peewee import Database, PostgresqlDatabase

from .db import add_to_commit
from .limits import effective_limits, limits_sql
from .models import (
    GLOBAL_SCOPE,
    Activity,
    DailyPeak,
    LoadRefusalDay,
    LoadRefusalMinute,
    QuotaRule,
    Usage,
    User,
    naive_utc,
)
from .windows import Window


def _q(name: str) -> str:
    return f'"{name}"'


class CounterSQL:
    def __init__(self, db: Database):
        self.db = db
        p = db.param
        user, rule = _q(User._meta.table_name), _q(QuotaRule._meta.table_name)
        usage, activity = _q(Usage._meta.table_name), _q(Activity._meta.table_name)
        self._created_at = User._meta.fields["created_at"].db_value
        self.sql_user = f'SELECT "id" FROM {user} WHERE "username" = {p}'
        self.sql_insert_user = (
            f'INSERT INTO {user} ("username", "created_at") VALUES ({p}, {p}) '
            'ON CONFLICT ("username") DO NOTHING RETURNING "id"'
        )
        self.sql_limits = limits_sql(rule, p)  # precedence lives in quotaserver.limits
        self.sql_window_row_used = f"({p}, {p}, {p}, {p}, {p})"
        key = (
            f'"user_id" = {p} AND "command_type" = {p} AND "period" = {p} AND "window_start" = {p}'
        )
        self.sql_decrement = f'UPDATE {usage} SET "used" = "used" - {p} WHERE {key}'
        self._many: dict[tuple, str] = {}
        #: PostgreSQL runs the counters' upsert and the daily peak as one statement (a
        #: data-modifying WITH, which SQLite lacks).
        self.peak_in_upsert = isinstance(db, PostgresqlDatabase)
        # The user's id (a row (id, NULL, NULL, NULL), none for an unknown user) and the
        # rules that apply to it (global ones, and its own), in one round trip.
        self.sql_user_limits = (
            f'SELECT "id", NULL, NULL, NULL FROM {user} WHERE "username" = {p} UNION ALL '
            f'SELECT NULL, r."scope", r."period", r."limit" FROM {rule} AS r '
            f'WHERE r."command_type" = {p} AND r."scope" IN '
            f'({p}, (SELECT CAST("id" AS TEXT) FROM {user} WHERE "username" = {p}))'
        )
        # Every window's counter in one statement: created already counting the consume
        # (at 0 where it does not fit), or raised where it fits; the rows that refuse are
        # left alone and not returned. PostgreSQL takes the row locks in VALUES order, so
        # concurrent transactions lock a user's counters in one order (no deadlock).
        self.sql_upsert = (
            f'INSERT INTO {usage} ("user_id", "command_type", "period", "window_start", "used") '
            "VALUES {rows} "
            'ON CONFLICT ("user_id", "command_type", "period", "window_start") DO UPDATE SET '
            f'"used" = {usage}."used" + {p} WHERE {{terms}} RETURNING "period", "used"'
        )
        self.sql_upsert_limited = f'({usage}."period" = {p} AND {usage}."used" + {p} <= {p})'
        self.sql_upsert_unlimited = f'{usage}."period" = {p}'
        self.sql_used = (
            f'SELECT "period", "window_start", "used" FROM {usage} '
            f'WHERE "user_id" = {p} AND "command_type" = {p} AND "window_start" IN ({{keys}})'
        )
        self.sql_activity = (
            f'INSERT INTO {activity} ("minute", "commands", "violations") VALUES ({p}, {p}, {p}) '
            'ON CONFLICT ("minute") DO UPDATE SET '
            f'"commands" = {activity}."commands" + excluded."commands", '
            f'"violations" = {activity}."violations" + excluded."violations"'
        )
        refused_minute = _q(LoadRefusalMinute._meta.table_name)
        refused_day = _q(LoadRefusalDay._meta.table_name)
        self.sql_refused_minute = (
            f'INSERT INTO {refused_minute} ("minute", "refused") VALUES ({p}, {p}) '
            f'ON CONFLICT ("minute") DO UPDATE SET "refused" = {refused_minute}."refused" + '
            'excluded."refused"'
        )
        self.sql_refused_day = (
            f'INSERT INTO {refused_day} ("user_id", "day", "refused") VALUES ({p}, {p}, {p}) '
            f'ON CONFLICT ("user_id", "day") DO UPDATE SET "refused" = {refused_day}."refused" + '
            'excluded."refused"'
        )
        peak = _q(DailyPeak._meta.table_name)
        # Today's peak only rises with usage (resets and limit changes recompute it); a row
        # of an earlier day is replaced.
        # One row (sql_peak) or many (sql_peaks, a batch's, one row per user).
        self.sql_peaks = (
            f'INSERT INTO {peak} ("user_id", "day", "rank", "username") '
            "VALUES {rows} "
            'ON CONFLICT ("user_id") DO UPDATE SET '
            f'"rank" = CASE WHEN {peak}."day" = excluded."day" AND {peak}."rank" < excluded."rank" '
            f'THEN {peak}."rank" ELSE excluded."rank" END, "day" = excluded."day"'
        )
        self.sql_peak = self.sql_peaks.format(rows=f"({p}, {p}, {p}, {p})")

        # PostgreSQL: the peak rides on the upsert, written only when every window took the
        # count; the rank as utilization() computes it (PostgreSQL's round of a double
        # rounds half to even, as Python's round does).
        self.sql_upsert_peak = (
            "WITH up AS ({upsert}), pk AS ("
            f'INSERT INTO {peak} ("user_id", "day", "rank", "username") '
            f'SELECT {p}, {p}, {{rank}}, {p} FROM up WHERE up."period" = {p} '
            f'AND (SELECT count(*) FROM up WHERE up."used" > 0 OR {p} = 0) = {p} '
            'ON CONFLICT ("user_id") DO UPDATE SET '
            f'"rank" = CASE WHEN {peak}."day" = excluded."day" AND {peak}."rank" < excluded."rank" '
            f'THEN {peak}."rank" ELSE excluded."rank" END, "day" = excluded."day") '
            'SELECT "period", "used" FROM up'
        )
        self.sql_rank_fixed = f"CAST({p} AS DOUBLE PRECISION)"
        self.sql_rank_used = (
            f'-(round(100.0 * CAST(up."used" AS DOUBLE PRECISION) / {p} * 10) / 10)'
        )

        # -- a batch, set-wise: a handful of statements whatever its size -------------
        self.sql_users_named = (
            f'SELECT "id", "username" FROM {user} WHERE "username" IN ({{names}})'
        )
        self.sql_insert_users = (
            f'INSERT INTO {user} ("username", "created_at") VALUES {{rows}} '
            'ON CONFLICT ("username") DO NOTHING RETURNING "id", "username"'
        )
        self.sql_rules_of = (
            f'SELECT "scope", "command_type", "period", "limit" FROM {rule} '
            'WHERE "command_type" IN ({types}) AND "scope" IN ({scopes})'
        )
        # Every counter a batch touches: created at 0 where missing, and read, in one
        # statement; on PostgreSQL the no-op update also locks them, in VALUES order (the
        # single consume's order: by user and type, then shortest window first).
        self.sql_lock_counters = (
            f'INSERT INTO {usage} ("user_id", "command_type", "period", "window_start", "used") '
            'VALUES {rows} ON CONFLICT ("user_id", "command_type", "period", "window_start") '
            f'DO UPDATE SET "used" = {usage}."used" '
            'RETURNING "user_id", "command_type", "period", "used"'
        )
        self.sql_set_counters = (
            f'INSERT INTO {usage} ("user_id", "command_type", "period", "window_start", "used") '
            'VALUES {rows} ON CONFLICT ("user_id", "command_type", "period", "window_start") '
            'DO UPDATE SET "used" = excluded."used"'
        )

    def _run(self, sql: str, params: tuple):
        return self.db.execute_sql(sql, params)

    def _marks(self, n: int, width: int = 1) -> str:
        """``n`` comma-separated placeholders, or ``n`` rows of ``width`` of them."""
        p = self.db.param
        if width == 1:
            return ", ".join([p] * n)
        row = "(" + ", ".join([p] * width) + ")"
        return ", ".join([row] * n)

    def user_id(self, username: str) -> int | None:
        row = self._run(self.sql_user, (username,)).fetchone()
        return row[0] if row else None

    def ensure_user(self, username: str, now: datetime) -> int:
        """The user's id, creating the user on first sight."""
        found = self.user_id(username)  # the usual case: one read
        if found is not None:
            return found
        row = self._run(
            self.sql_insert_user, (username, self._created_at(naive_utc(now)))
        ).fetchone()
        if row is not None:
            return row[0]
        return self.user_id(username)  # created meanwhile by another transaction

    def limits(
        self, user_id: int | None, command_type: str, periods: tuple[str, ...]
    ) -> dict[str, int | None]:
        """Effective limits: a user's rule for a period beats the global one; none = unlimited."""
        scope = GLOBAL_SCOPE if user_id is None else str(user_id)
        rows = self._run(self.sql_limits, (command_type, GLOBAL_SCOPE, scope)).fetchall()
        return effective_limits(rows, periods)

    def user_and_limits(
        self, username: str, command_type: str, periods: tuple[str, ...], now: datetime
    ) -> tuple[int, dict[str, int | None]]:
        """The user's id (created on first sight) and its effective limits for
        ``command_type``."""
        rows = self._run(
            self.sql_user_limits, (username, command_type, GLOBAL_SCOPE, username)
        ).fetchall()
        user_id = next((r[0] for r in rows if r[0] is not None), None)
        limits = effective_limits([r[1:] for r in rows if r[0] is None], periods)
        if user_id is not None:
            return user_id, limits
        row = self._run(
            self.sql_insert_user, (username, self._created_at(naive_utc(now)))
        ).fetchone()
        if row is not None:
            # Created now: it has no rules of its own (rules are set only on existing users,
            # and users are never deleted, so no stale rule can carry its id).
            return row[0], limits
        # Created meanwhile by another transaction, which may have given it rules.
        user_id = self.user_id(username)
        return user_id, self.limits(user_id, command_type, periods)

    def increment_all(
        self,
        user_id: int,
        command_type: str,
        windows: dict[str, Window],
        count: int,
        limits: dict[str, int | None],
        peak: tuple[str, int] | None = None,
    ) -> tuple[dict[str, int], str | None]:
        """Add ``count`` to every window's counter, or to none if any would pass its limit.

        Returns the counters after the call and the first refusing window (None: admitted).
        Runs inside the caller's transaction: a refusal takes back what it added, so the
        transaction sees the counters unchanged (no savepoint needed). With ``peak`` (the
        user name and daily key; only where :attr:`peak_in_upsert`) an admitted consume's
        daily peak is raised by the same statement, as :meth:`raise_peak` would.
        """
        daily = limits.get("daily", 0) if peak is not None else 0
        rank_form = None if peak is None else ("used" if daily else "fixed")
        shape = (tuple((p, limits[p] is None) for p in windows), rank_form)
        sql = self._many.get(shape)
        if sql is None:
            rows = ", ".join([self.sql_window_row_used] * len(windows))
            terms = " OR ".join(
                self.sql_upsert_unlimited if unlimited else self.sql_upsert_limited
                for _, unlimited in shape[0]
            )
            sql = self.sql_upsert.format(rows=rows, terms=terms)
            if rank_form is not None:
                rank = self.sql_rank_used if rank_form == "used" else self.sql_rank_fixed
                sql = self.sql_upsert_peak.format(upsert=sql, rank=rank)
            self._many[shape] = sql
        params: list = []
        for period, window in windows.items():
            limit = limits[period]
            start = count if limit is None or count <= limit else 0
            params += (user_id, command_type, period, window.key, start)
        params.append(count)
        for period in windows:  # the terms, in shape order
            limit = limits[period]
            params += (period,) if limit is None else (period, count, limit)
        if peak is not None:
            username, day = peak
            rank = (1.0 if daily is None else -100.0) if rank_form == "fixed" else daily
            params += (user_id, day, rank, username, "daily", count, len(windows))
        # A returned row took ``count`` unless it is a new row left at 0 (it did not fit).
        added = {
            period: used
            for period, used in self._run(sql, tuple(params)).fetchall()
            if used > 0 or count == 0
        }
        refused = next((p for p in windows if p not in added), None)
        if refused is None:
            return added, None
        for period in added:
            key = (user_id, command_type, period, windows[period].key)
            self._run(self.sql_decrement, (count, *key))
        return self.used(user_id, command_type, windows), refused

    # -- batches ------------------------------------------------------------------------
    def users_and_limits_of(
        self, pairs: list[tuple[str, str]], periods: tuple[str, ...], now: datetime
    ) -> tuple[dict[str, int], dict[tuple[int, str], dict[str, int | None]]]:
        """For a batch's distinct (user name, command type) pairs: every user's id (created
        on first sight) and the effective limits of every pair by (user id, command type),
        in three statements."""
        usernames = list(dict.fromkeys(name for name, _ in pairs))
        command_types = list(dict.fromkeys(command_type for _, command_type in pairs))
        found = self._run(
            self.sql_users_named.format(names=self._marks(len(usernames))), tuple(usernames)
        ).fetchall()
        ids = {name: user_id for user_id, name in found}
        missing = [name for name in usernames if name not in ids]
        if missing:
            at = self._created_at(naive_utc(now))
            params = tuple(v for name in missing for v in (name, at))
            sql = self.sql_insert_users.format(rows=self._marks(len(missing), 2))
            for user_id, name in self._run(sql, params).fetchall():
                ids[name] = user_id
            for name in missing:  # created meanwhile by another transaction
                if name not in ids:
                    ids[name] = self.user_id(name)
        scopes = [GLOBAL_SCOPE, *{str(i) for i in ids.values()}]
        sql = self.sql_rules_of.format(
            types=self._marks(len(command_types)), scopes=self._marks(len(scopes))
        )
        rules: dict[tuple[str, str], list] = {}
        for scope, command_type, period, limit in self._run(sql, (*command_types, *scopes)):
            rules.setdefault((command_type, scope), []).append((scope, period, limit))
        limits = {}
        for name, command_type in pairs:
            user_id = ids[name]
            rows = rules.get((command_type, GLOBAL_SCOPE), []) + rules.get(
                (command_type, str(user_id)), []
            )
            limits[user_id, command_type] = effective_limits(rows, periods)
        return ids, limits

    def lock_counters(
        self, keys: list[tuple[int, str]], windows: dict[str, Window]
    ) -> dict[tuple[int, str], dict[str, int]]:
        """The counters of every (user id, command type) in ``keys`` (sorted), in this
        transaction's hands: created at 0 where missing and, on PostgreSQL, locked."""
        params: list = []
        for user_id, command_type in keys:
            for period, window in windows.items():
                params += (user_id, command_type, period, window.key, 0)
        sql = self.sql_lock_counters.format(rows=self._marks(len(keys) * len(windows), 5))
        counters: dict[tuple[int, str], dict[str, int]] = {key: {} for key in keys}
        for user_id, command_type, period, used in self._run(sql, tuple(params)).fetchall():
            counters[user_id, command_type][period] = used
        return counters

    def set_counters(
        self, counters: dict[tuple[int, str], dict[str, int]], windows: dict[str, Window]
    ) -> None:
        """Write the counters of :meth:`lock_counters` back, as they are now."""
        if not counters:
            return
        params: list = []
        for (user_id, command_type), used in sorted(counters.items()):
            for period, window in windows.items():
                params += (user_id, command_type, period, window.key, used[period])
        rows = len(counters) * len(windows)
        self._run(self.sql_set_counters.format(rows=self._marks(rows, 5)), tuple(params))

    def raise_peaks(self, peaks: dict[int, tuple[float, str]], day: int) -> None:
        """:meth:`raise_peak` for many users at once: ``{user id: (rank, name)}`` (each
        user's lowest :func:`peak_rank` of the batch)."""
        if not peaks:
            return
        params: list = []
        for user_id, (rank, username) in sorted(peaks.items()):
            params += (user_id, day, rank, username)
        self._run(self.sql_peaks.format(rows=self._marks(len(peaks), 4)), tuple(params))

    def used(self, user_id: int | None, command_type: str, windows: dict[str, Window]) -> dict:
        used = dict.fromkeys(windows, 0)
        if user_id is None:
            return used
        keys = {w.key for w in windows.values()}
        sql = self.sql_used.format(keys=self._marks(len(keys)))
        for period, window_start, value in self._run(sql, (user_id, command_type, *keys)):
            if period in windows and windows[period].key == window_start:
                used[period] = value
        return used

    def bump_activity(self, minute: int, commands: int = 0, violations: int = 0) -> None:
        """Add to the minute's totals in this transaction: summed with the other units of a
        group commit and written once, before its COMMIT; written at once otherwise."""
        if not add_to_commit(self.write_activity, minute, (commands, violations)):
            self._run(self.sql_activity, (minute, commands, violations))

    def write_activity(self, totals: dict) -> None:
        """Add ``{minute: (commands, violations)}`` to the minutes' rows."""
        for minute, (commands, violations) in sorted(totals.items()):
            self._run(self.sql_activity, (minute, commands, violations))

    def bump_refused(self, minute: int, user_id: int | None, day: int) -> None:
        """Count one consume refused for load (a request, as a violation is one): in the
        minute's total, and in the user's day when the user is known (summed per group
        commit, like the activity)."""
        if not add_to_commit(self._write_refused_minutes, minute, (1,)):
            self._run(self.sql_refused_minute, (minute, 1))
        if user_id is None:
            return
        if not add_to_commit(self._write_refused_days, (user_id, day), (1,)):
            self._run(self.sql_refused_day, (user_id, day, 1))

    def _write_refused_minutes(self, totals: dict) -> None:
        for minute, (count,) in sorted(totals.items()):
            self._run(self.sql_refused_minute, (minute, count))

    def _write_refused_days(self, totals: dict) -> None:
        for (user_id, day), (count,) in sorted(totals.items()):
            self._run(self.sql_refused_day, (user_id, day, count))

    def raise_peak(self, user_id: int, username: str, day: int, percent: float | None) -> None:
        """Record ``percent`` of a daily limit (None: unlimited) as a candidate for the
        user's peak today."""
        self._run(self.sql_peak, (user_id, day, peak_rank(percent), username))


def peak_rank(percent: float | None) -> float:
    """A daily peak's ``rank``: minus the percent, 1 when unlimited (lowest ranks first)."""
    return 1.0 if percent is None else -percent
