"""Limit precedence, once: a user's rule for a period beats the global default; no rule
means unlimited. The consume hot path resolves the same precedence in SQL
(``CounterSQL.limits``); everything else loads rules in bulk through :class:`Rules`.
"""

from __future__ import annotations

from collections.abc import Iterable

from .models import GLOBAL_SCOPE, QuotaRule

Limits = dict[str, dict[str, int | None]]  # command type -> period -> limit


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

    def limit(self, user_id: int, command_type: str, period: str) -> int | None:
        own = self.overrides.get(user_id, {}).get(command_type, {})
        if period in own:
            return own[period]
        return self.defaults.get(command_type, {}).get(period)

    def overridden(self, user_id: int, command_type: str, period: str) -> bool:
        return period in self.overrides.get(user_id, {}).get(command_type, {})
