"""One-time login codes: how the start-up link signs a browser in without a token in a URL.

A code stands for a token (by its digest) for a few minutes and works once. The link printed
at start-up carries it in the fragment (``/login#code=...``), which browsers never send to a
server, a proxy's access log or a Referer; the login page POSTs it with its XSRF token.
Codes live in memory only: a restart invalidates them, and prints a new one.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

MAX_CODES = 64


@dataclass(frozen=True, slots=True)
class _Code:
    token_digest: str
    expires: float


class LoginCodes:
    def __init__(self, lifetime: float, clock: Callable[[], float] = time.monotonic):
        self.lifetime = lifetime
        self.clock = clock
        self._codes: dict[str, _Code] = {}  # sha256(code) -> what it stands for

    def issue(self, token_digest: str) -> str:
        """A new code for the token with this digest."""
        now = self.clock()
        self._codes = {k: c for k, c in self._codes.items() if c.expires > now}
        while len(self._codes) >= MAX_CODES:
            self._codes.pop(next(iter(self._codes)))
        code = secrets.token_urlsafe(24)
        self._codes[_key(code)] = _Code(token_digest, now + self.lifetime)
        return code

    def adopt(self, code: str, token_digest: str) -> None:
        """Accept a code issued elsewhere: the parent of worker processes issues the start-up
        link's code once and every worker adopts it (so it works once per worker)."""
        self._codes[_key(code)] = _Code(token_digest, self.clock() + self.lifetime)

    def redeem(self, code: str) -> str | None:
        """The token digest of a valid code, which is spent by this call; else None."""
        entry = self._codes.pop(_key(code), None)
        if entry is None or entry.expires <= self.clock():
            return None
        return entry.token_digest


def _key(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest()
