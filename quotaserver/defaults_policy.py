"""What the YAML's ``quotas.defaults`` mean after the first start (``quotas.defaults_policy``).

The global default limits live in the database, where the dashboard and the admin API change
them. The YAML's copy seeds them once; afterwards an edited YAML used to change nothing, with
no word about it. Now, at every start and on SIGHUP:

- ``seed`` (the default): limits missing from the database are inserted; every limit where
  the YAML and the database differ is one warning naming both values. The database wins, so
  a limit an admin changed in the dashboard is never reverted by a restart.
- ``enforce``: the YAML wins. Each differing limit is written as the admin API would write
  it (audited as ``config``, published as a ``quota_change``), so configuration management
  owns the limits and the dashboard's edits last until the next start or reload.

A limit missing from the YAML, like ``null``, means unlimited (conf/quotaserver.yaml says so);
command types the YAML does not list are left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .models import GLOBAL_SCOPE, QuotaRule
from .rules import RuleService

if TYPE_CHECKING:
    from collections.abc import Callable

    from .config import Config
    from .quota import QuotaService
    from .realtime.messages import Message

log = logging.getLogger(__name__)
POLICIES = ("seed", "enforce")
ACTOR = "config"  # the audit log's actor for limits the YAML imposed


@dataclass(frozen=True)
class Difference:
    command_type: str
    period: str
    configured: int | None  # the YAML's (None: unlimited)
    stored: int | None  # the database's

    def describe(self) -> str:
        def text(limit: int | None) -> str:
            return "unlimited" if limit is None else str(limit)

        return (
            f"quotas.defaults.{self.command_type}.{self.period}: the configuration says "
            f"{text(self.configured)}, the database has {text(self.stored)}"
        )


def stored_limits() -> dict[tuple[str, str], int | None]:
    """The global limits in the database: ``(command type, period) -> limit``."""
    return {
        (row.command_type, row.period): row.limit
        for row in QuotaRule.select().where(QuotaRule.scope == GLOBAL_SCOPE)
    }


def compare(
    defaults: dict, stored: dict[tuple[str, str], int | None], periods: list[str]
) -> list[Difference]:
    """Tracked limits where ``defaults`` (the YAML's) and ``stored`` disagree."""
    out = []
    for command_type, limits in sorted(defaults.items()):
        for period in periods:
            configured, current = limits.get(period), stored.get((command_type, period))
            if configured != current:
                out.append(Difference(command_type, period, configured, current))
    return out


def differences(quota: QuotaService, defaults: dict) -> list[Difference]:
    """:func:`compare` with the database; runs on a database thread (``Store.run``)."""
    return compare(defaults, stored_limits(), quota.periods)


async def reconcile(
    quota: QuotaService, config: Config, publish: Callable[[list[Message]], None]
) -> list[Difference]:
    """Seed what is missing, then warn about (``seed``) or apply (``enforce``) every limit
    where ``config`` and the database differ; return those differences."""
    store = quota.store
    defaults = config["quotas.defaults"]
    await store.run(quota.seed_defaults, defaults)
    found = await store.run(differences, quota, defaults)
    policy = config["quotas.defaults_policy"]
    if policy == "enforce":
        rules = RuleService(quota, publish)
        by_type: dict[str, dict[str, int | None]] = {}
        for diff in found:
            by_type.setdefault(diff.command_type, {})[diff.period] = diff.configured
        for command_type, limits in by_type.items():
            await rules.set_global_limits(command_type, limits, ACTOR)
        for diff in found:
            log.info("%s: applied (quotas.defaults_policy: enforce)", diff.describe())
    else:
        for diff in found:
            log.warning(
                "%s, which is enforced (quotas.defaults_policy: seed: change it in the "
                "dashboard, or set enforce to make the file win)",
                diff.describe(),
            )
    return found
