"""Shared parsing for the two stream transports."""

from __future__ import annotations

import re
from collections.abc import Collection

from .base import ApiError

TYPE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
CURSOR = re.compile(r"[0-9]{1,19}\Z", re.ASCII)


def ascii_cursor(raw: str | None) -> str | None:
    """A resume cursor as the hub may read it: ASCII digits only, else "" (invalid).

    ``int()`` would read "٣" (an Arabic-Indic digit) as 3, " 3" as 3 and "1_0" as 10; the
    hub answers "" with ``recovered: false, reason: invalid_cursor`` like any bad cursor.
    """
    if raw is None:
        return None
    return raw if CURSOR.match(raw) else ""


def parse_types(raw: str | None, known: Collection[str]) -> frozenset[str] | None:
    """``"violation,alert"`` -> a set of type names; None or empty -> everything.

    A name that is not in ``known`` (the core's types and those the plugins declared) is
    refused: a filter on a type nobody sends would be a stream that stays silent.
    """
    if raw is None or not raw.strip():
        return None
    names = [t.strip() for t in raw.split(",") if t.strip()]
    bad = [t for t in names if not TYPE_NAME.match(t)]
    if bad or len(names) > 32:
        raise ApiError(400, "invalid_types", "types must be a comma-separated list of type names")
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise ApiError(
            400,
            "invalid_types",
            f"unknown event type {', '.join(unknown)} (known: {', '.join(sorted(known))})",
        )
    return frozenset(names)
