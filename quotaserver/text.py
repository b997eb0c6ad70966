"""What a name may contain: no character that hides, reorders or fakes what an admin sees.

User names and command types are shown on the dashboard and in the audit log. A right-to-
left override or a zero-width space makes ``x\\u202eevil\\u200b`` display as "xlive", so
every control, format (bidi, zero-width), private-use, unassigned and separator character
is refused, as are the characters that render as blank glyphs. The plain space stays.
"""

from __future__ import annotations

import unicodedata

# Cc controls, Cf format (bidi overrides and isolates, zero-width), Cs surrogates, Co private
# use, Cn unassigned, Zl/Zp line and paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
# Letters (Lo) that render as nothing: Hangul fillers, the braille blank.
_BLANK_GLYPHS = frozenset("\u115f\u1160\u3164\uffa0\u2800")


def hidden_character(value: str) -> str | None:
    """A description of the first invisible or bidirectional character, or None."""
    if value.isascii() and value.isprintable():
        return None  # printable ASCII: letters, digits, punctuation, symbols, the space
    for char in value:
        category = unicodedata.category(char)
        refused = (
            category in _REFUSED_CATEGORIES
            or (category == "Zs" and char != " ")
            or char in _BLANK_GLYPHS
        )
        if refused:
            return f"U+{ord(char):04X} ({category})"
    return None


#: Combining marks allowed in a row: enough for any language after NFC (Vietnamese stacks
#: two), far from the "Zalgo" towers that overflow a table row.
MAX_COMBINING_RUN = 4
#: Names the dashboard's URLs cannot address (a path segment "." or ".." is resolved away).
UNADDRESSABLE = frozenset({".", ".."})


def normalize_name(value: str) -> str:
    """The one spelling of a name: NFC, so that NFC and NFD ``zoë`` are one user."""
    return value if value.isascii() else unicodedata.normalize("NFC", value)


def name_problem(value: str) -> str | None:
    """Why a (normalised) name is refused, or None: blank at either end, ``.``/``..``, or
    more than :data:`MAX_COMBINING_RUN` combining marks in a row."""
    if value != value.strip():
        return "must not start or end with whitespace"
    if value in UNADDRESSABLE:
        return "must not be '.' or '..'"
    if not value.isascii():
        run = 0
        for char in value:
            run = run + 1 if unicodedata.category(char).startswith("M") else 0
            if run > MAX_COMBINING_RUN:
                return f"must not have more than {MAX_COMBINING_RUN} combining marks in a row"
    return None
