"""The users list in O(page), in plain SQL and tuples: by name, by today's utilisation,
by violations or load refusals today, with prefix search.

Every order is served by an index, and pages continue from a **cursor** (the sort key of
the last row shown, quotaserver.cursors) instead of an offset, so page 20,000 costs what
page 1 costs:

- by name: case-insensitively, ``lower(username)`` then ``username`` (an expression
  index);
- by utilisation: first today's active users from ``daily_peak (day, rank, username)``
  (rank = minus the peak percent), then everyone idle today by name.

Search matches a **prefix** of the user name, case-insensitively (``"ali"`` finds ``Alice``
and ``alison``, not ``kali``): a prefix is an index range, a substring is a full scan.
``page`` numbers still work (an offset into the same orders) for small tables and for
jumping; clients that page through many users follow ``next_cursor``.

At a million users a users page's SQL takes about 2 ms (SQLite releases the GIL meanwhile);
building the same page through the ORM took about 5 ms more of Python (composing and
rendering every statement, then a model instance per row), all of it holding the GIL that
the event loop and the consume writer need. Here every statement is a string written once
per dialect (placeholder, and ``COLLATE "C"`` on PostgreSQL) and rows stay tuples.
``tests/test_users_page.py`` compares every page with the same page built through the ORM
(``tests/ranking_oracle.py``, the reference form of these queries) on a mixed dataset.
"""

from __future__ import annotations

import time
from datetime import datetime
from functools import cache
from typing import Any, NamedTuple
from weakref import WeakKeyDictionary

from peewee import Database, PostgresqlDatabase

from .limits import Rules
from .models import (
    GLOBAL_SCOPE,
    DailyPeak,
    Event,
    LoadRefusalDay,
    QuotaRule,
    Usage,
    User,
    Violation,
    naive_utc,
)

U = f'"{User._meta.table_name}"'
P = f'"{DailyPeak._meta.table_name}"'

FEW_MATCHES = 2000  # a search matching at most this many users ranks them by key lookups


REBASE_AFTER = 10_000  # users created since the last full count before counting again
RECOUNT_AFTER = 5.0  # PostgreSQL: seconds before a full count is taken again
_counted: WeakKeyDictionary[Database, tuple[int, int, float]] = WeakKeyDictionary()


def _all_users(db: Database) -> int:
    """How many users there are, without counting them all on every users page.

    A full count (40 ms on SQLite, 70 ms on PostgreSQL at a million users) is remembered
    with the highest id it saw; later calls add the users with a higher id (an index
    range). On SQLite that is exact: users are never deleted and ids are handed out in
    commit order (one writer at a time), so a read snapshot holds exactly the ids up to
    some point. PostgreSQL's ids may commit out of order (a user whose id was drawn before
    the count but committed after it is not in either part), so there the full count is
    taken again after ``RECOUNT_AFTER`` seconds: its total may lag by that much for users
    created while it was counted, never more.
    """
    base = _counted.get(db)
    table = f'"{User._meta.table_name}"'
    stale = base is not None and time.monotonic() - base[2] > RECOUNT_AFTER
    if stale and isinstance(db, PostgresqlDatabase):
        base = None
    # Plain statements (no ORM query to compose and render): every users page runs these.
    if base is not None and (_scalar(db, f'SELECT MAX("id") FROM {table}') or 0) >= base[0]:
        top, count, _at = base
        newer = _scalar(db, f'SELECT COUNT(*) FROM {table} WHERE "id" > {db.param}', top)
        if newer <= REBASE_AFTER:
            return count + newer
    top, count = db.execute_sql(f'SELECT MAX("id"), COUNT("id") FROM {table}').fetchone()
    _counted[db] = (top or 0, count, time.monotonic())
    return count


def _scalar(db: Database, sql: str, *params: Any) -> Any:
    return db.execute_sql(sql, params).fetchone()[0]


def _upper_bound(prefix: str) -> str:
    """The smallest string greater than every string starting with ``prefix``."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class UserRow(NamedTuple):
    """What a page shows of a user (the attributes ``AdminQueries._user_json`` reads)."""

    id: int
    username: str
    created_at: datetime


@cache
def _dialect(param: str, collate: bool) -> dict[str, str]:
    """Every statement of a users page, with ``?`` as the placeholder ``param``."""
    low = 'LOWER("t1"."username")' + (' COLLATE "C"' if collate else "")
    low2 = 'LOWER("t2"."username")' + (' COLLATE "C"' if collate else "")
    lowp = "LOWER(?)" + (' COLLATE "C"' if collate else "")
    users = f'SELECT "t1"."id", "t1"."username", "t1"."created_at" FROM {U} AS "t1"'
    sql = {
        "match": f"({low} >= ? AND {low} < ?)",
        "match2": f"({low2} >= ? AND {low2} < ?)",
        "after_name": f'({low} >= {lowp} AND ({low}, "t1"."username") > ({lowp}, ?))',
        "name_order": f' ORDER BY {low}, "t1"."username"',
        "users": users,
        "users_by_id": users + ' WHERE "t1"."id" IN ',
        "idle": (
            f'NOT EXISTS(SELECT "t2"."user_id" FROM {P} AS "t2" '
            'WHERE "t2"."user_id" = "t1"."id" AND "t2"."day" = ?)'
        ),
        "few": f'SELECT COUNT(1) FROM (SELECT 1 FROM {U} AS "t1" WHERE {{}} LIMIT ?) AS "w"',
        "count": f'SELECT COUNT(1) FROM {U} AS "t1" WHERE {{}}',
        "active": f'SELECT "t1"."user_id", "t1"."rank", "t1"."username" FROM {P} AS "t1" WHERE ',
        "active_count": f'SELECT COUNT(1) FROM {P} AS "t1" WHERE ',
        "by_key": (
            f'"t1"."user_id" IN (SELECT "t2"."id" FROM {U} AS "t2" WHERE {{}}) '
            'AND ("t1"."day" + 0) = ?'
        ),
        "by_day": '"t1"."day" = ?',
        # The cursor's rank as the column's type: PostgreSQL keeps ranks as 4-byte REAL,
        # and -76.7 as a double is below the stored -76.69999..., so the row would repeat.
        "after_rank": '("t1"."rank", "t1"."username") > (CAST(? AS REAL), ?)',
        "rank_order": ' ORDER BY "t1"."rank", "t1"."username"',
        "usage": (
            'SELECT "user_id", "command_type", "used" FROM '
            f"\"{Usage._meta.table_name}\" WHERE (\"period\" || '') = 'daily' "
            'AND ("window_start" + 0) = ? AND "user_id" IN '
        ),
        "violations": (
            f'SELECT "user_id", COUNT("id") FROM "{Violation._meta.table_name}" '
            'WHERE "created_at" >= ? AND "user_id" IN '
        ),
        # Today's violators, most violations first: a range of the created_at index, grouped.
        "violators": (
            f'SELECT "t1"."id", "t1"."username", "t1"."created_at" FROM {U} AS "t1" '
            f'JOIN "{Violation._meta.table_name}" AS "v" ON "v"."user_id" = "t1"."id" '
            'WHERE "v"."created_at" >= ? {} GROUP BY "t1"."id", "t1"."username", '
            f'"t1"."created_at" ORDER BY COUNT("v"."id") DESC, {low}, "t1"."username" '
            "LIMIT ? OFFSET ?"
        ),
        "violators_count": (
            f'SELECT COUNT(DISTINCT "v"."user_id") FROM "{Violation._meta.table_name}" AS "v" '
            f'JOIN {U} AS "t1" ON "t1"."id" = "v"."user_id" WHERE "v"."created_at" >= ? {{}}'
        ),
        "refused": (
            f'SELECT "user_id", "refused" FROM "{LoadRefusalDay._meta.table_name}" '
            'WHERE "day" = ? AND "user_id" IN '
        ),
        # Today's users refused for load, most first: the day index's range.
        "refusers": (
            f'SELECT "t1"."id", "t1"."username", "t1"."created_at" FROM {U} AS "t1" '
            f'JOIN "{LoadRefusalDay._meta.table_name}" AS "r" ON "r"."user_id" = "t1"."id" '
            'WHERE "r"."day" = ? {} '
            f'ORDER BY "r"."refused" DESC, {low}, "t1"."username" LIMIT ? OFFSET ?'
        ),
        "refusers_count": (
            f'SELECT COUNT(*) FROM "{LoadRefusalDay._meta.table_name}" AS "r" '
            f'JOIN {U} AS "t1" ON "t1"."id" = "r"."user_id" WHERE "r"."day" = ? {{}}'
        ),
        "rules": (
            'SELECT "scope", "user_id", "command_type", "period", "limit" '
            f'FROM "{QuotaRule._meta.table_name}" WHERE "scope" IN '
        ),
        "seq": f'SELECT "id" FROM "{Event._meta.table_name}" ORDER BY "id" DESC LIMIT 1',
    }
    return {k: v.replace("?", param) for k, v in sql.items()}


class UsersPage:
    """One listing request: ``search`` prefix (may be empty) and today's ``day`` key; its
    rows are :class:`UserRow` tuples."""

    def __init__(self, db: Database, search: str, day: int):
        self.db = db
        self.search = search.lower()
        self.day = day
        self.collate = isinstance(db, PostgresqlDatabase)
        self.param = db.param
        self.sql = _dialect(db.param, self.collate)
        self._created = User.created_at.python_value

    def _rows(self, sql: str, params: list | tuple = ()) -> list[tuple]:
        return self.db.execute_sql(sql, params).fetchall()

    def _in(self, values: list) -> str:
        return "(" + ", ".join([self.param] * len(values)) + ")"

    def _users(self, rows: list[tuple]) -> list[UserRow]:
        created = self._created
        return [UserRow(i, name, created(at)) for i, name, at in rows]

    def _match(self, key: str = "match") -> tuple[str | None, list]:
        if not self.search:
            return None, []
        return self.sql[key], [self.search, _upper_bound(self.search)]

    def total(self) -> int:
        if self.search:
            cond, params = self._match()
            return self._rows(self.sql["count"].format(cond), params)[0][0]
        return _all_users(self.db)

    def seq(self) -> int:
        rows = self._rows(self.sql["seq"])
        return rows[0][0] if rows else 0

    # -- by name -------------------------------------------------------------------------
    def _by_name(
        self, conds: list[str], params: list, after: dict | None, offset: int, limit: int
    ) -> list[UserRow]:
        conds = list(conds)
        params = list(params)
        if after is not None:
            conds.append(self.sql["after_name"])
            params += [after["n"], after["n"], after["n"]]
        sql = self.sql["users"]
        if conds:
            sql += " WHERE " + " AND ".join(conds)
        sql += self.sql["name_order"] + f" LIMIT {self.param}"
        params.append(limit)
        if offset:
            sql += f" OFFSET {self.param}"
            params.append(offset)
        return self._users(self._rows(sql, params))

    def by_name(self, page: Any, after: dict | None) -> tuple[list[UserRow], dict | None]:
        cond, params = self._match()
        offset = page.offset if after is None else 0
        users = self._by_name([cond] if cond else [], params, after, offset, page.per_page + 1)
        return _page(users, page.per_page, lambda u: {"n": u.username})

    # -- by utilisation ------------------------------------------------------------------
    def _active_today(self) -> tuple[str, list]:
        if self.search:
            cond, params = self._match()
            few = self._rows(self.sql["few"].format(cond), [*params, FEW_MATCHES + 1])[0][0]
            if few <= FEW_MATCHES:
                cond2, params2 = self._match("match2")
                return self.sql["by_key"].format(cond2), [*params2, self.day]
        cond, params = self._match()
        if cond is None:
            return self.sql["by_day"], [self.day]
        return self.sql["by_day"] + " AND " + cond, [self.day, *params]

    def by_utilization(self, page: Any, after: dict | None) -> tuple[list[UserRow], dict | None]:
        want = page.per_page + 1
        users: list[tuple[UserRow, float | None]] = []
        skip = 0 if after is not None else page.offset
        if after is None or "r" in after:
            where, params = self._active_today()
            active = self.sql["active"] + where
            if after is not None:
                active += " AND " + self.sql["after_rank"]
                params = [*params, after["r"], after["n"]]
            sql = active + self.sql["rank_order"] + f" LIMIT {self.param}"
            args = [*params, want]
            if skip:
                sql += f" OFFSET {self.param}"
                args.append(skip)
            rows = self._rows(sql, args)
            if skip and not rows:  # the offset lies beyond the active users
                # (an offset comes without a cursor: ``params`` are the day's alone)
                skip -= self._rows(self.sql["active_count"] + where, params)[0][0]
            else:
                skip = 0
            if rows:
                ids = [r[0] for r in rows]
                found = self._rows(self.sql["users_by_id"] + self._in(ids), ids)
                by_id = {u.id: u for u in self._users(found)}
                users = [(by_id[user_id], rank) for user_id, rank, _name in rows]
            after = None  # the idle part starts from its beginning
        if len(users) < want:
            cond, params = self._match()
            conds = ([cond] if cond else []) + [self.sql["idle"]]
            idle = self._by_name(
                conds,
                [*params, self.day],
                after if after is not None and "r" not in after else None,
                max(skip, 0),
                want - len(users),
            )
            users += [(u, None) for u in idle]

        def key(row: tuple[UserRow, float | None]) -> dict:
            user, rank = row
            return {"n": user.username} if rank is None else {"r": rank, "n": user.username}

        shown, last = _page(users, page.per_page, key)
        return [u for u, _ in shown], last

    # -- the rest of a page --------------------------------------------------------------
    def rules(self, user_ids: list[int]) -> Rules:
        scopes = [GLOBAL_SCOPE, *(str(i) for i in user_ids)]
        return Rules.from_rows(self._rows(self.sql["rules"] + self._in(scopes), scopes))

    def daily_usage(self, user_ids: list[int]) -> dict[int, dict[str, int]]:
        used: dict[int, dict[str, int]] = {}
        if not user_ids:
            return used
        sql = self.sql["usage"] + self._in(user_ids)
        for user_id, command_type, n in self._rows(sql, [self.day, *user_ids]):
            used.setdefault(user_id, {})[command_type] = n
        return used

    def violations_today(self, user_ids: list[int], since: datetime) -> dict[int, int]:
        if not user_ids:
            return {}
        since_value = Violation.created_at.db_value(naive_utc(since))
        sql = self.sql["violations"] + self._in(user_ids) + ' GROUP BY "user_id"'
        return dict(self._rows(sql, [since_value, *user_ids]))

    def by_violations(self, page: Any, since: datetime) -> tuple[list[UserRow], int]:
        """The users with violations today, most first (then by name), and how many there
        are. Offset pages only: the order changes with every violation, a cursor would not
        hold. The cost grows with today's violations, not with the users."""
        cond, params = self._match()
        extra = f"AND {cond}" if cond else ""
        since_value = Violation.created_at.db_value(naive_utc(since))
        sql = self.sql["violators"].format(extra)
        rows = self._rows(sql, [since_value, *params, page.per_page, page.offset])
        total = self._rows(self.sql["violators_count"].format(extra), [since_value, *params])
        return self._users(rows), total[0][0]

    def by_refused(self, page: Any) -> tuple[list[UserRow], int]:
        """The users with consumes refused for load today, most first (then by name), and
        how many there are; offset pages, as :meth:`by_violations`."""
        cond, params = self._match()
        extra = f"AND {cond}" if cond else ""
        sql = self.sql["refusers"].format(extra)
        rows = self._rows(sql, [self.day, *params, page.per_page, page.offset])
        total = self._rows(self.sql["refusers_count"].format(extra), [self.day, *params])
        return self._users(rows), total[0][0]

    def load_refusals_today(self, user_ids: list[int]) -> dict[int, int]:
        """Consumes of these users refused for load today (the primary key's range)."""
        if not user_ids:
            return {}
        sql = self.sql["refused"] + self._in(user_ids)
        return dict(self._rows(sql, [self.day, *user_ids]))


def _page(rows: list, size: int, key: Any) -> tuple[list, dict | None]:
    if len(rows) > size:
        return rows[:size], key(rows[size - 1])
    return rows, None
