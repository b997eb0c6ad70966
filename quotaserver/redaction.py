"""Credentials kept out of logs, as defence in depth.

Our own code logs names and token ids, never tokens or their digests, and the access log has
no query strings; this filter catches records we do not write ourselves (Tornado's, and the
SQL that peewee logs at debug level, which carries token digests as parameters).
"""

from __future__ import annotations

import logging
import re

_REDACTIONS = (
    (re.compile(r"(?i)(bearer\s+)[^\s'\",;]+"), r"\1<redacted>"),
    (re.compile(r"(?i)([?&;](?:token|code)=)[^&\s'\"]+"), r"\1<redacted>"),
    (re.compile(r"(?i)(qs_session=)[^;\s'\"]+"), r"\1<redacted>"),
    (re.compile(r"qs_[A-Za-z0-9_-]{16,}"), "<redacted>"),
    (re.compile(r"(Invalid header value ).*"), r"\1<redacted>"),
    # SHA-256 digests (token digests in SQL parameters) and their 16-digit ids are kept
    # apart: a token id is meant to be logged, a digest is not.
    (re.compile(r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{64}(?![0-9A-Fa-f])"), "<digest>"),
)
REDACTED_LOGGERS = (
    "tornado.access",
    "tornado.application",
    "tornado.general",
    "asyncio",
    "peewee",
    "",
)


def redact(text: str) -> str:
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


class RedactSecrets(logging.Filter):
    """Rewrites a record whose text looks like it carries a credential."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's problem, not ours
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def install_log_redaction() -> None:
    """Attach :class:`RedactSecrets` to Tornado's, asyncio's and peewee's loggers."""
    for name in REDACTED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
