"""Query-string parsing for the admin API: every bad value is a 400 in the error envelope."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import tornado.web

from ..admin_queries import PageRequest
from .base import ApiError

MAX_PER_PAGE = 200
ASCII_INTEGER = re.compile(r"-?[0-9]{1,19}\Z", re.ASCII)


def int_arg(
    handler: tornado.web.RequestHandler, name: str, default: int | None, low: int, high: int
) -> int | None:
    raw = handler.get_query_argument(name, None)
    if raw is None or raw == "":
        return default
    # ASCII only: int() also reads other scripts' digits ("٣" is 3), "1_0" and " 1".
    if not ASCII_INTEGER.match(raw):
        raise ApiError(400, "invalid_parameter", f"{name} must be an integer")
    value = int(raw)
    if not low <= value <= high:
        raise ApiError(400, "invalid_parameter", f"{name} must be within {low}..{high}")
    return value


def page_arg(handler: tornado.web.RequestHandler, per_page: int = 50) -> PageRequest:
    page = int_arg(handler, "page", 1, 1, 1_000_000)
    size = int_arg(handler, "per_page", per_page, 1, MAX_PER_PAGE)
    return PageRequest(page, size)


def str_arg(handler: tornado.web.RequestHandler, name: str, max_length: int = 255) -> str | None:
    """An optional text filter; empty means absent."""
    raw = handler.get_query_argument(name, None)
    if raw is None or raw == "":
        return None
    if len(raw) > max_length:
        raise ApiError(400, "invalid_parameter", f"{name} is longer than {max_length} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise ApiError(400, "invalid_parameter", f"{name} must not contain control characters")
    return raw


def choice_arg(
    handler: tornado.web.RequestHandler, name: str, choices: tuple[str, ...], default: Any = None
) -> Any:
    raw = handler.get_query_argument(name, None)
    if raw is None or raw == "":
        return default
    if raw not in choices:
        raise ApiError(400, "invalid_parameter", f"{name} must be one of {', '.join(choices)}")
    return raw


def time_arg(handler: tornado.web.RequestHandler, name: str) -> datetime | None:
    """An RFC 3339 / ISO 8601 instant; without an offset it is read as UTC."""
    raw = handler.get_query_argument(name, None)
    if raw is None or raw == "":
        return None
    raw = raw.strip()
    if "T" in raw:
        raw = raw.replace(" ", "+")  # an unencoded "+01:00" arrives as " 01:00"
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise ApiError(
            400, "invalid_parameter", f"{name} must be an RFC 3339 time, e.g. 2026-03-10T12:00:00Z"
        ) from None
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value
    try:
        value.astimezone(UTC)  # 0001-01-01T00:00+01:00 has no UTC representation
    except OverflowError:
        raise ApiError(400, "invalid_parameter", f"{name} is out of range") from None
    return value
