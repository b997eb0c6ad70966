"""Keyset cursors: the sort key of the last row shown, as an opaque URL-safe string.

Admin lists page from a cursor instead of an offset, so page 20,000 costs what page 1
costs (quotaserver.users_page, quotaserver.admin_queries).
"""

from __future__ import annotations

import base64
import json
from typing import Any


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
