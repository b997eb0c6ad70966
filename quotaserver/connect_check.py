"""``check-config --connect``: reach the database and the backplane as ``serve`` would.

Validating the file alone passed configurations that ``serve`` then refused: an unreachable
PostgreSQL or Redis, a missing driver. With ``--connect`` the check opens the configured
database with the configured timeouts (``database.connect_timeout``, ``statement_timeout``),
runs ``SELECT 1``, reads the global limits actually in force, and PINGs the backplane. It
creates nothing: a SQLite file that does not exist yet is reported, not made.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import ConfigError
from .db import open_database, sqlite_path
from .defaults_policy import stored_limits
from .models import QuotaRule

if TYPE_CHECKING:
    from .config import Config


@dataclass
class ConnectReport:
    """What ``--connect`` found: problems (exit 2) and the limits in force."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: None when the database has no schema yet (the first start creates it)
    limits: dict[tuple[str, str], int | None] | None = None


def check_connections(config: Config) -> ConnectReport:
    """Reach the database and the backplane (blocking: the CLI, not the server)."""
    report = ConnectReport()
    _check_database(config, report)
    _check_backplane(config, report)
    return report


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _check_database(config: Config, report: ConnectReport) -> None:
    url = config["database.url"]
    if url.startswith("sqlite:"):
        path = sqlite_path(url)
        if not os.path.exists(path):
            report.notes.append(f"database: {path} does not exist yet (the first start creates it)")
            return
        try:
            # Read-only and without WAL changes: the check must not take the write lock.
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1.0)
            db.close()
        except sqlite3.Error as exc:
            report.problems.append(f"database.url: cannot open {path}: {_first_line(exc)}")
            return
    try:
        db = open_database(
            url,
            busy_timeout=config["database.busy_timeout"],
            connect_timeout=config["database.connect_timeout"],
            statement_timeout=config["database.statement_timeout"],
        )
    except ConfigError as exc:  # a missing driver, an SQLite directory that cannot be made
        report.problems.append(str(exc))
        return
    try:
        db.connect()
        db.execute_sql("SELECT 1").fetchone()
        if not db.table_exists(QuotaRule._meta.table_name):
            report.notes.append("database: reachable, no schema yet (the first start creates it)")
            return
        with db.bind_ctx([QuotaRule]):
            report.limits = stored_limits()
    except Exception as exc:  # noqa: BLE001 - any driver error: name it, exit 2
        report.problems.append(f"database.url: cannot use the database: {_first_line(exc)}")
    finally:
        with contextlib.suppress(Exception):
            db.close()


def _check_backplane(config: Config, report: ConnectReport) -> None:
    url = config["backplane.url"]
    if not url:
        return
    try:
        import redis
    except ImportError:
        report.problems.append("backplane.url: the redis package is not installed")
        return
    # The backplane's own connect timeout (quotaserver.realtime.backplane).
    client: Any = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001 - refused, timed out, NOAUTH...
        report.problems.append(f"backplane.url: cannot reach Redis: {_first_line(exc)}")
    finally:
        client.close()
