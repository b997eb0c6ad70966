"""Request validation, in one place for every handler: names, command types and counts of
a body, and the query-string parameters of the admin API. Every bad value is a 400 in the
error envelope; the body's shape (fields, JSON) is :func:`base.json_body`'s."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

import tornado.web

from ..admin_queries import PageRequest
from ..limits import whole_number
from ..text import hidden_character, name_problem, normalize_name
from .base import ApiError, control_character

MAX_PER_PAGE = 200
ASCII_INTEGER = re.compile(r"-?[0-9]{1,19}\Z", re.ASCII)


def validate_username(value: Any, max_length: int, field: str = "user") -> str:
    """The name in its one spelling (NFC), or 400: see docs/api.md for what a name may be."""
    if not isinstance(value, str):
        raise ApiError(400, "invalid_field", f"{field} must be a string")
    value = normalize_name(value)  # before anything else: NFC and NFD are one user
    if not value.strip():
        raise ApiError(400, "invalid_field", f"{field} must not be empty")
    if len(value) > max_length:
        raise ApiError(400, "invalid_field", f"{field} is longer than {max_length} characters")
    if control_character(value):
        raise ApiError(400, "invalid_field", f"{field} must not contain control characters")
    refuse_hidden(value, field)
    problem = name_problem(value)
    if problem:
        raise ApiError(400, "invalid_field", f"{field} {problem}")
    return value


def refuse_hidden(value: str, field: str) -> None:
    """400 invalid_field for a name with an invisible or bidirectional character."""
    hidden = hidden_character(value)
    if hidden:
        raise ApiError(
            400,
            "invalid_field",
            f"{field} must not contain invisible or bidirectional characters ({hidden})",
        )


def validate_count(value: Any, max_count: int) -> int:
    value = whole_number(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(400, "invalid_field", "count must be an integer")
    if value <= 0:
        raise ApiError(400, "invalid_field", "count must be positive")
    if value > max_count:
        raise ApiError(400, "invalid_field", f"count must be at most {max_count}")
    return value


def validate_command_type(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ApiError(400, "invalid_field", "command_type must be a non-empty string")
    refuse_hidden(value, "command_type")
    return value


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
