"""Limit precedence, once: a user's rule for a period beats the global default; no rule
means unlimited (None).

This module is the one owner of that rule, in both of its forms:

- the single-user resolution the consume hot path runs: :func:`limits_sql` (the statement
  :class:`quotaserver.counters.CounterSQL` compiles once per database) and
  :func:`effective_limits` (the precedence over the rows it returns);
- :class:`Rules`, every rule (or those of some users) loaded in one query, for the admin
  queries, the standings and the analytics plugin.

Both apply :func:`pick`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .models import GLOBAL_SCOPE, QuotaRule

Limits = dict[str, dict[str, int | None]]  # command type -> period -> limit
_MISSING = object()


def pick(
    own: Mapping[str, int | None], defaults: Mapping[str, int | None], period: str
) -> int | None:
    """The limit of ``period``: the user's own rule if it has one (even None: unlimited),
    else the global default, else None (unlimited)."""
    value = own.get(period, _MISSING)
    if value is not _MISSING:
        return value  # type: ignore[return-value]
    return defaults.get(period)


def limits_sql(rule_table: str, param: str) -> str:
    """The hot path's query: ``(scope, period, limit)`` rows of one command type for the
    global scope and one user's scope (parameters: command type, GLOBAL_SCOPE, scope)."""
    return (
        f'SELECT "scope", "period", "limit" FROM {rule_table} '
        f'WHERE "command_type" = {param} AND "scope" IN ({param}, {param})'
    )


def effective_limits(
    rows: Iterable[tuple[str | None, str | None, int | None]], periods: Iterable[str]
) -> dict[str, int | None]:
    """Effective limits of ``periods`` from ``(scope, period, limit)`` rows of one user and
    command type (the global scope and the user's); rows of other periods (or an empty
    joined row) are ignored."""
    tracked = set(periods)
    own: dict[str, int | None] = {}
    defaults: dict[str, int | None] = {}
    for scope, period, limit in rows:
        if period in tracked:
            (defaults if scope == GLOBAL_SCOPE else own)[period] = limit
    return {p: pick(own, defaults, p) for p in periods}


class Rules:
    """Global defaults and per-user overrides, loaded once per query."""

    def __init__(self, user_ids: Iterable[int] | None = None):
        self.defaults: Limits = {}
        self.overrides: dict[int, Limits] = {}
        query = QuotaRule.select(QuotaRule.scope, QuotaRule.user, QuotaRule.command_type,
                                 QuotaRule.period, QuotaRule.limit)  # fmt: skip
        if user_ids is not None:
            scopes = [GLOBAL_SCOPE, *(str(i) for i in user_ids)]
            query = query.where(QuotaRule.scope.in_(scopes))
        for row in query:
            if row.scope == GLOBAL_SCOPE:
                target = self.defaults
            else:
                target = self.overrides.setdefault(row.user_id, {})
            target.setdefault(row.command_type, {})[row.period] = row.limit

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, int | None, str, str, int | None]]) -> Rules:
        """Rules from ``(scope, user_id, command_type, period, limit)`` rows read elsewhere
        (the users page reads them as plain tuples)."""
        rules = cls.__new__(cls)
        rules.defaults, rules.overrides = {}, {}
        for scope, user_id, command_type, period, limit in rows:
            if scope == GLOBAL_SCOPE:
                target = rules.defaults
            else:
                target = rules.overrides.setdefault(user_id, {})
            target.setdefault(command_type, {})[period] = limit
        return rules

    def limit(self, user_id: int, command_type: str, period: str) -> int | None:
        own = self.overrides.get(user_id, {}).get(command_type, {})
        return pick(own, self.defaults.get(command_type, {}), period)

    def overridden(self, user_id: int, command_type: str, period: str) -> bool:
        return period in self.overrides.get(user_id, {}).get(command_type, {})


def whole_number(value: Any) -> Any:
    """``2.0`` as ``2``: JSON (and JSON Schema's ``integer``) do not tell them apart, so
    neither do counts and limits; anything else is returned as it is, for the caller to check."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
