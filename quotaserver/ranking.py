"""The users list in O(page): by name or by today's utilisation, with prefix search.

Every order is served by an index, and pages continue from a **cursor** (the sort key of
the last row shown) instead of an offset, so page 20,000 costs what page 1 costs:

- by name: case-insensitively, ``lower(username)`` then ``username`` (an expression
  index);
- by utilisation: first today's active users from ``daily_peak (day, rank, username)``
  (rank = minus the peak percent), then everyone idle today by name.

Search matches a **prefix** of the user name, case-insensitively (``"ali"`` finds ``Alice``
and ``alison``, not ``kali``): a prefix is an index range, a substring is a full scan.
``page`` numbers still work (an offset into the same orders) for small tables and for
jumping; clients that page through many users follow ``next_cursor``.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any
from weakref import WeakKeyDictionary

from peewee import SQL, Cast, Database, PostgresqlDatabase, Tuple, Value, fn

from .models import DailyPeak, User

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


class BadCursor(ValueError):
    """A cursor this server did not produce."""


def encode_cursor(key: dict[str, Any]) -> str:
    raw = json.dumps(key, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(text: str, fields: dict[str, type | tuple[type, ...]] | None = None) -> dict:
    """The key an :func:`encode_cursor` produced; ``fields`` names the keys it must hold and
    their types (default: the users list's ``{"n": str}``). Raises :class:`BadCursor`."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        key = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadCursor("cursor is not valid") from None
    if not isinstance(key, dict) or not all(isinstance(v, str | int | float) for v in key.values()):
        raise BadCursor("cursor is not valid")
    for name, kind in (fields or {"n": str}).items():
        value = key.get(name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BadCursor("cursor is not valid")
    return key


def _upper_bound(prefix: str) -> str:
    """The smallest string greater than every string starting with ``prefix``."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class UserRanking:
    """One listing request: ``search`` prefix (may be empty) and today's ``day`` key."""

    def __init__(self, db: Database, search: str, day: int):
        self.search = search.lower()
        self.day = day
        self.collate = isinstance(db, PostgresqlDatabase)
        self.db = db

    # -- filters -------------------------------------------------------------------------
    def _lower(self, field: Any) -> Any:
        expr = fn.LOWER(field)
        return expr.collate('"C"') if self.collate else expr

    def _match(self, field: Any) -> Any:
        """The prefix range on ``lower(field)`` (always true when there is no search)."""
        if not self.search:
            return SQL("1 = 1")
        low = self._lower(field)
        return (low >= self.search) & (low < _upper_bound(self.search))

    def _active_today(self) -> Any:
        """Today's peaks of the matching users, by the cheaper of two index paths.

        Walking today's ranking and filtering by name costs about ``page x active /
        matching`` rows: fine for a common prefix, a scan of the day for a rare one. A rare
        prefix (few matches, counted on the name index up to FEW_MATCHES) instead reads
        its users from the name index and their peaks by key, then sorts those few.
        """
        if self.search:
            matching = User.select(User.id).where(self._match(User.username))
            if matching.limit(FEW_MATCHES + 1).count() <= FEW_MATCHES:
                # "day + 0": not the (day, rank) index, the user key for each match.
                return DailyPeak.user.in_(matching) & ((DailyPeak.day + 0) == self.day)
        return (DailyPeak.day == self.day) & self._match(DailyPeak.username)

    def _idle(self) -> Any:
        today = DailyPeak.select(DailyPeak.user).where(
            (DailyPeak.user == User.id) & (DailyPeak.day == self.day)
        )
        return ~fn.EXISTS(today)

    def total(self) -> int:
        if self.search:
            return User.select().where(self._match(User.username)).count()
        return _all_users(self.db)

    # -- by name -------------------------------------------------------------------------
    def _name_order(self, query: Any, after: dict | None) -> Any:
        """Case-insensitive alphabetical order (then exact name), from the expression index."""
        if after is not None:
            low = self._lower(User.username)
            # The plain bound lets SQLite start the index range there (a row value on an
            # expression index alone makes it scan from the start: O(depth)).
            query = query.where(
                # lower() of the database on both sides: Python's str.lower() differs
                # beyond ASCII (SQLite's leaves "É" as it is) and would skip names.
                (low >= self._lower(Value(after["n"])))
                & (Tuple(low, User.username) > Tuple(self._lower(Value(after["n"])), after["n"]))
            )
        return query.order_by(self._lower(User.username), User.username)

    def by_name(self, page: Any, after: dict | None) -> tuple[list[User], dict | None]:
        query = self._name_order(User.select().where(self._match(User.username)), after)
        if after is None:
            query = query.offset(page.offset)
        users = list(query.limit(page.per_page + 1))
        return self._page(users, page.per_page, lambda u: {"n": u.username})

    # -- by utilisation ------------------------------------------------------------------
    def by_utilization(self, page: Any, after: dict | None) -> tuple[list[User], dict | None]:
        """Active users by peak (highest first, then name), then idle users by name."""
        want = page.per_page + 1
        users: list[User] = []
        skip = 0 if after is not None else page.offset
        if after is None or "r" in after:
            active = (
                DailyPeak.select(DailyPeak.user, DailyPeak.rank, DailyPeak.username)
                .where(self._active_today())
                .order_by(DailyPeak.rank, DailyPeak.username)
            )
            if after is not None:
                active = active.where(
                    # As the column's type (4-byte REAL on PostgreSQL): else the row
                    # of the cursor compares above its own rank and repeats.
                    Tuple(DailyPeak.rank, DailyPeak.username)
                    > Tuple(Cast(Value(after["r"]), "REAL"), after["n"])
                )
            rows = list(active.offset(skip).limit(want).tuples())
            if skip and not rows:  # the offset lies beyond the active users
                skip -= active.count()
            else:
                skip = 0
            by_id = {u.id: u for u in User.select().where(User.id.in_([r[0] for r in rows]))}
            for user_id, rank, _name in rows:
                user = by_id[user_id]
                user.rank = rank
                users.append(user)
            after = None  # the idle part starts from its beginning
        if len(users) < want:
            idle = self._name_order(
                User.select().where(self._match(User.username) & self._idle()),
                after if after is not None and "r" not in after else None,
            )
            users += list(idle.offset(max(skip, 0)).limit(want - len(users)))

        def key(user: User) -> dict:
            rank = getattr(user, "rank", None)
            return {"n": user.username} if rank is None else {"r": rank, "n": user.username}

        return self._page(users, page.per_page, key)

    @staticmethod
    def _page(rows: list[User], size: int, key: Any) -> tuple[list[User], dict | None]:
        if len(rows) > size:
            return rows[:size], key(rows[size - 1])
        return rows, None
