"""The users list built through the ORM: the reference form of quotaserver.users_page's
plain SQL, which tests/test_users_page.py compares page by page (same arguments, same rows
and cursors; models instead of tuples)."""

from __future__ import annotations

from typing import Any

from peewee import SQL, Cast, Database, PostgresqlDatabase, Tuple, Value, fn

from quotaserver import users_page
from quotaserver.models import DailyPeak, User
from quotaserver.users_page import _all_users, _upper_bound


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
        prefix (few matches, counted on the name index up to users_page.FEW_MATCHES) instead reads
        its users from the name index and their peaks by key, then sorts those few.
        """
        if self.search:
            matching = User.select(User.id).where(self._match(User.username))
            if matching.limit(users_page.FEW_MATCHES + 1).count() <= users_page.FEW_MATCHES:
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
