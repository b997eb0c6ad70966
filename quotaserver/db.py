"""The database: connection by URL, SQLite durability pragmas, migrations, off-loop runner.

Every query runs on a worker thread (``await store.run(fn)``) so a slow statement never
delays heartbeats or fan-out. SQLite gets one worker: it has one writer anyway, and a
single thread keeps its commit order equal to its event-id order.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

from peewee import Database, SqliteDatabase
from playhouse.db_url import connect

from . import models
from .config import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")


def _migration_1(db: Database) -> None:
    """Initial schema."""
    db.create_tables([m for m in models.ALL_MODELS if m is not models.SchemaVersion])


def _migration_2(db: Database) -> None:
    """API tokens (digests only) and token/session revocations."""
    db.create_tables(list(models.AUTH_MODELS))


# Append-only: (version, function). Never edit a released migration; add a new one.
MIGRATIONS: tuple[tuple[int, Callable[[Database], None]], ...] = (
    (1, _migration_1),
    (2, _migration_2),
)


def open_database(url: str, synchronous: str = "full") -> Database:
    """Connect by URL; for SQLite create the file's directory and set the pragmas."""
    if url.startswith("sqlite:"):
        # sqlite:///relative/path.db or sqlite:////absolute/path.db, as playhouse reads them
        path = url.removeprefix("sqlite:").removeprefix("//")
        path = path[1:] if path.startswith("/") else path
        if not path or path == ":memory:":
            raise ConfigError("database.url: an SQLite database needs a file path")
        directory = os.path.dirname(path)
        if directory:
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as exc:
                raise ConfigError(
                    f"database.url: cannot create {directory}: {exc.strerror}"
                ) from None
        return SqliteDatabase(
            path,
            pragmas={
                "journal_mode": "wal",
                "foreign_keys": 1,
                "synchronous": synchronous,
                "busy_timeout": 5000,
            },
            check_same_thread=False,
        )
    try:
        return connect(url)
    except (RuntimeError, ImportError) as exc:
        raise ConfigError(f"database.url: {exc}") from None
    except ValueError:
        raise ConfigError("database.url: unsupported database URL") from None


def migrate(db: Database) -> int:
    """Apply pending migrations in order, each in its own transaction; return the version."""
    db.create_tables([models.SchemaVersion])
    current = models.SchemaVersion.select().order_by(models.SchemaVersion.version.desc()).first()
    version = current.version if current else 0
    for number, step in MIGRATIONS:
        if number <= version:
            continue
        with db.atomic():
            step(db)
            models.SchemaVersion.create(
                version=number, applied_at=datetime.now(UTC).replace(tzinfo=None)
            )
        log.info("applied migration %d: %s", number, (step.__doc__ or "").strip())
        version = number
    return version


class Store:
    """Owns the database connection and the worker threads that use it."""

    def __init__(self, url: str, synchronous: str = "full", pool_size: int = 4):
        self.url = url
        self.db = open_database(url, synchronous)
        self.is_sqlite = isinstance(self.db, SqliteDatabase)
        models.database_proxy.initialize(self.db)
        workers = 1 if self.is_sqlite else pool_size
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="db")

    def migrate(self) -> int:
        return migrate(self.db)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on a database worker thread and return its result."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def ping(self) -> bool:
        try:
            self.db.execute_sql("SELECT 1").fetchone()
            return True
        except Exception:  # noqa: BLE001 - health reports any failure as "unreachable"
            log.warning("database ping failed", exc_info=True)
            return False

    def close(self) -> None:
        """Wait for queued work (so no write is cut short), then close connections."""
        # Connections are per thread: close the worker's own before stopping it.
        self._executor.submit(self._close_connection).result()
        self._executor.shutdown(wait=True)
        self._close_connection()

    def _close_connection(self) -> None:
        if not self.db.is_closed():
            self.db.close()
