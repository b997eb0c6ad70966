"""CSV exports of the admin lists: the users list and the violations, with the same filters
as their JSON endpoints, written page by page (each page one admin read, then flushed), so
a long export holds neither the whole list in memory nor a database snapshot for its
duration. Rows written while an export runs may or may not appear in it; none appears twice
(the pages follow the lists' cursors).

Spreadsheets run a cell that starts with ``=``, ``+``, ``-``, ``@``, tab or carriage return
as a formula: such text (a user name like ``=HYPERLINK(...)``) is written with a leading
``'``, as OWASP recommends. Numbers are written as they are.
"""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
PAGE = 500  # rows per admin read


def cell(value: Any) -> Any:
    """A value as a CSV cell: text that a spreadsheet would run is quoted with ``'``."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def encode(rows: list[list[Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    for row in rows:
        writer.writerow([cell(v) for v in row])
    return out.getvalue()


def user_header(command_types: list[str]) -> list[str]:
    columns = ["username", "user_id", "created_at"]
    for c in command_types:
        columns += [f"{c}_used", f"{c}_limit", f"{c}_percent", f"{c}_overridden"]
    return [*columns, "max_percent", "risk", "violations_today", "load_refusals_today"]


def user_row(item: dict[str, Any], command_types: list[str]) -> list[Any]:
    """One item of ``GET /users`` as a CSV row (the same figures, in ``user_header`` order)."""
    row = [item["username"], item["user_id"], item["created_at"]]
    for c in command_types:
        u = item["usage"][c]
        row += [u["used"], "unlimited" if u["limit"] is None else u["limit"], u["percent"]]
        row.append("yes" if u["overridden"] else "no")
    risk = item["risk"] or ""
    return [*row, item["max_percent"], risk, item["violations_today"], item["load_refusals_today"]]


VIOLATION_HEADER = ["id", "created_at", "username", "command_type", "period", "limit",
                    "attempted", "message"]  # fmt: skip


def violation_row(item: dict[str, Any]) -> list[Any]:
    return [item[k] for k in VIOLATION_HEADER]


async def pages(
    read: Callable[[str | None, int], Awaitable[dict[str, Any]]],
) -> AsyncIterator[dict[str, Any]]:
    """Every page of a list: ``read(cursor, page_number)`` answers one; follows
    ``next_cursor``, or page numbers for a list that has none (``pages`` tells the end)."""
    cursor, number = None, 1
    while True:
        page = await read(cursor, number)
        yield page
        if page.get("next_cursor"):
            cursor = page["next_cursor"]
        elif cursor is None and number < page.get("pages", 1) and page["items"]:
            number += 1  # an order without cursors (users by violations today)
        else:
            return
