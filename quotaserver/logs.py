"""Logging: the process-wide set-up (text or JSON lines, UTC timestamps) and the access log.

What is never logged: tokens, cookies, passwords and query strings (a login URL carries a
token). ``redaction.install_log_redaction``, installed by the entry point, also scrubs
anything token-shaped that slips into a message.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tornado.web

    from .config import Config

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class UTCFormatter(logging.Formatter):
    """``2026-11-28T07:30:00.123Z INFO quotaserver: ...``"""

    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        # One record, one line: a driver's multi-line error or a traceback keeps its line
        # breaks as ``\n``, so line-based tools (journald, grep, a shipper) see one record.
        return super().format(record).replace("\r", "\\r").replace("\n", "\\n")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


class JSONFormatter(UTCFormatter):
    """One JSON object per line: time, level, logger, message (and the traceback if any)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(config: Config) -> None:
    """Send every log record to stderr at ``server.log_level`` in ``server.log_format``."""
    handler = logging.StreamHandler(sys.stderr)
    if config["server.log_format"] == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(UTCFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config["server.log_level"].upper())


ACCESS_LOG = logging.getLogger("tornado.access")


def log_request(handler: tornado.web.RequestHandler) -> None:
    """Access log without query strings (a login URL carries a token).

    Successful requests and quota denials (429) are the normal traffic of a quota server,
    logged at DEBUG so they cannot drown the rest; other 4xx at WARNING, 5xx at ERROR. A
    handler may set ``access_log_level`` for a response that is routine despite its status
    (a consume refused while the server sheds load is a 503 at INFO).
    """
    status = handler.get_status()
    level = getattr(handler, "access_log_level", None)
    if level is None:
        if status >= 500:
            level = logging.ERROR
        elif status >= 400 and status != 429:
            level = logging.WARNING
        else:
            level = logging.DEBUG
    if not ACCESS_LOG.isEnabledFor(level):
        return  # most requests at the default level: no line, no formatting
    request = handler.request
    ACCESS_LOG.log(
        level,
        "%d %s %s (%s) %.1fms",
        status,
        request.method,
        request.path,
        request.remote_ip,
        1000.0 * request.request_time(),
    )
