"""The route table read as data: the methods a handler implements, a pattern's groups."""

from __future__ import annotations

import tornado.web

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def group_spans(pattern: str) -> list[tuple[int, int]]:
    """Top-level capture groups of a route pattern, as (start, end) spans."""
    spans, depth, start, i, in_class = [], 0, 0, 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "(":
            if depth == 0:
                start = i
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                spans.append((start, i + 1))
        i += 1
    return spans


def implemented(cls: type) -> list[str]:
    base = tornado.web.RequestHandler
    return [m for m in METHODS if getattr(cls, m.lower()) is not getattr(base, m.lower())]
