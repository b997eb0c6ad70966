"""Each user's peak utilisation of a daily limit today, kept current for O(page) rankings.

The consume path raises a user's peak as counters grow (``CounterSQL.raise_peak``); the
only other things that change utilisation are admin changes, which recompute the peaks of
the users they touch (:func:`recompute`), in the same transaction. ``tests`` compare the
maintained values with a recount from the usage table after mixed workloads.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .limits import Rules
from .models import DailyPeak, Usage, User

if TYPE_CHECKING:
    from .windows import Window

CHUNK = 500  # users recomputed per statement batch


def utilization(used: int, limit: int | None) -> float | None:
    """Percent of ``limit`` used; None when unlimited; a zero limit counts as exhausted."""
    if limit is None:
        return None
    if limit == 0:
        return 100.0
    return round(100.0 * used / limit, 1)


def daily_of(user_ids: list[int], day_key: int) -> Any:
    """The condition "today's daily windows of ``user_ids``", looked up **by user**.

    The day's terms are written so that no index can serve them (``period || ''``,
    ``window_start + 0``): the planner must take the per-user index (a few rows per user)
    instead of the day's range over every active user, which SQLite picks without
    statistics (0.8 s for 25 users at a million).
    """
    return (
        Usage.user.in_(user_ids)
        & (Usage.period.concat("") == "daily")
        & ((Usage.window_start + 0) == day_key)
    )


def peaks(user_ids: list[int], day: Window) -> dict[int, float | None]:
    """Recount: each user's highest daily utilisation today from the usage table (users
    with no command today are left out; None: only unlimited command types used)."""
    rules = Rules(user_ids)
    top: dict[int, float | None] = {}
    rows = Usage.select(Usage.user, Usage.command_type, Usage.used).where(
        daily_of(user_ids, day.key) & (Usage.used > 0)
    )
    for user_id, command_type, used in rows.tuples():
        percent = utilization(used, rules.limit(user_id, command_type, "daily"))
        best = top.get(user_id)
        if user_id not in top or (percent is not None and (best is None or percent > best)):
            top[user_id] = percent
    return top


def recompute(user_ids: Iterable[int], day: Window) -> None:
    """Set the peaks of ``user_ids`` from a recount (call inside the admin transaction)."""
    for chunk in _chunks(list(user_ids)):
        top = peaks(chunk, day)
        names = dict(User.select(User.id, User.username).where(User.id.in_(chunk)).tuples())
        DailyPeak.delete().where(DailyPeak.user.in_(chunk)).execute()
        rows = [
            {
                "user": user_id,
                "day": day.key,
                "rank": 1.0 if percent is None else -percent,
                "username": names[user_id],
            }
            for user_id, percent in top.items()
        ]
        if rows:
            DailyPeak.insert_many(rows).execute()


def users_with_usage(command_type: str, day: Window) -> Iterator[int]:
    """Users who used ``command_type`` today: those a change of its limits affects."""
    query = Usage.select(Usage.user).where(
        (Usage.period == "daily")
        & (Usage.window_start == day.key)
        & (Usage.command_type == command_type)
        & (Usage.used > 0)
    )
    for (user_id,) in query.tuples().iterator():
        yield user_id


def _chunks(items: list[int]) -> Iterator[list[int]]:
    for start in range(0, len(items), CHUNK):
        yield items[start : start + CHUNK]
