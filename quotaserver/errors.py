"""Domain errors carry their HTTP meaning: a status, a machine-readable code, a message.

Services raise them; one place renders them (``BaseHandler.write_error``, as the JSON
envelope ``{"error": {"code": ..., "message": ...}}`` with ``status`` and ``headers``), so no
handler translates a service's exception by hand. Plugins calling the services in process
catch them like any exception (``QuotaError`` is still a ``ValueError``, ``UnknownUser`` a
``LookupError``).
"""

from __future__ import annotations

import secrets
from typing import ClassVar


class DomainError(Exception):
    """A refusal a client can act on; never a 5xx traceback.

    Subclasses set ``status``, ``code`` and ``default_message``; an instance may override
    any of them, and add response ``headers`` (e.g. ``Retry-After``).
    """

    status: ClassVar[int] = 400
    code: str = "bad_request"
    default_message: ClassVar[str] = "the request was refused"

    def __init__(
        self,
        message: str | None = None,
        *,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ):
        self.message = message or self.default_message
        super().__init__(self.message)
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status  # type: ignore[misc] - per instance on purpose
        self.headers: dict[str, str] = dict(headers or {})


def error_id(exc: BaseException) -> str:
    """A short random id naming one failure: the client's answer carries it, the log line
    with the details (which the client must not see: hosts, ports, driver text) too."""
    ident = getattr(exc, "error_id", None)
    if ident is None:
        ident = secrets.token_hex(6)
        exc.error_id = ident  # type: ignore[attr-defined]
    return ident
