"""The database: connection by URL, SQLite durability pragmas, migrations, off-loop runner.

Every query runs on a worker thread (``await store.run(fn)``) so a slow statement never
delays heartbeats or fan-out.

SQLite gets one writer thread that **group-commits**: the units of work queued while a
transaction was being written run together in the next one, each inside its own savepoint
(a failing unit rolls back alone), and their callers are answered only after the single
COMMIT. With ``synchronous=full`` that is one fsync per batch instead of one per consume,
and one thread keeps commit order equal to event-id order.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
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
# Migrations 1 and 2 create tables from the models as they are today. The first change to
# an existing model must therefore come with an explicit ALTER migration (playhouse.migrate)
# and freeze 1-2 to the old definitions, or fresh and upgraded databases would differ.
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
    if url.startswith(("postgres://", "postgresql://")):
        try:
            import psycopg2  # noqa: F401 - only checks that the driver is installed
        except ImportError:
            raise ConfigError(
                "database.url: PostgreSQL needs the psycopg2 driver "
                "(pip install 'quotaserver[postgres]')"
            ) from None
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


class GroupCommitter:
    """One thread that runs queued units of work in shared transactions (see module doc)."""

    def __init__(self, db: Database, max_batch: int = 128):
        self.db = db
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="db-writer", daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], Any]) -> Future:
        future: Future = Future()
        self._queue.put((future, fn))
        return future

    def shutdown(self) -> None:
        """Finish everything queued, close the connection, stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            batch = []
            stop = item is None
            if not stop:
                batch.append(item)
            while not stop and len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    batch.append(item)
            if batch:
                self._run(batch)
            if stop:
                if not self.db.is_closed():
                    self.db.close()
                return

    def _run(self, batch: list[tuple[Future, Callable[[], Any]]]) -> None:
        outcomes: list[tuple[Future, bool, Any]] = []
        try:
            with self.db.atomic():
                for future, fn in batch:
                    if not future.set_running_or_notify_cancel():
                        continue
                    try:
                        with self.db.atomic():  # a savepoint per unit
                            outcomes.append((future, True, fn()))
                    except BaseException as exc:  # noqa: BLE001 - handed to the caller
                        outcomes.append((future, False, exc))
        except BaseException as exc:  # the COMMIT itself failed: nothing was written
            log.exception("group commit failed")
            for future, ok, _ in outcomes:
                if ok:
                    future.set_exception(exc)
            outcomes = [(f, False, v) for f, ok, v in outcomes if not ok]
        # Answer only now: every result handed out has been committed.
        for future, ok, value in outcomes:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)


class Store:
    """Owns the database connection and the worker threads that use it."""

    def __init__(self, url: str, synchronous: str = "full", pool_size: int = 4):
        self.url = url
        self.db = open_database(url, synchronous)
        self.is_sqlite = isinstance(self.db, SqliteDatabase)
        models.database_proxy.initialize(self.db)
        self._committer: GroupCommitter | None = None
        self._executor: ThreadPoolExecutor | None = None
        if self.is_sqlite:
            self._committer = GroupCommitter(self.db)
        else:
            self._executor = ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="db")

    def migrate(self) -> int:
        return migrate(self.db)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on a database worker thread and return its result (once committed)."""
        call = functools.partial(fn, *args, **kwargs)
        if self._committer is not None:
            return await asyncio.wrap_future(self._committer.submit(call))
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def run_committed(self, fn: Callable[[], T], after: Callable[[T], Any]) -> T:
        """Run ``fn``; once it has committed, call ``after(result)`` on the loop.

        ``after`` runs even if the awaiting caller is cancelled meanwhile (an emitter timing
        out, a shutdown): a committed event must still be published.
        """
        future = asyncio.ensure_future(self.run(fn))

        def committed(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                after(done.result())

        future.add_done_callback(committed)
        return await asyncio.shield(future)

    def ping(self) -> bool:
        try:
            self.db.execute_sql("SELECT 1").fetchone()
            return True
        except Exception:  # noqa: BLE001 - health reports any failure as "unreachable"
            log.warning("database ping failed", exc_info=True)
            return False

    def close(self) -> None:
        """Wait for queued work (so no write is cut short), then close connections."""
        if self._committer is not None:
            self._committer.shutdown()
        else:
            # Connections are per thread: close the worker's own before stopping it.
            self._executor.submit(self._close_connection).result()
            self._executor.shutdown(wait=True)
        self._close_connection()

    def _close_connection(self) -> None:
        if not self.db.is_closed():
            self.db.close()
