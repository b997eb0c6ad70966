"""The database: connection by URL, SQLite durability pragmas, migrations, off-loop runner.

Every query runs on a worker thread (``await store.run(fn)``) so a slow statement never
delays heartbeats or fan-out.

Faults become :class:`DatabaseUnavailable` or :class:`DatabaseBusy` (HTTP 503 with
Retry-After), never a hang: PostgreSQL gets connect and statement timeouts and callers stop
waiting after both; a connection found dead is replaced, and a unit of work that failed on
it before its first statement ran is retried once on the new one. SQLite waits
``busy_timeout`` for another process's lock, then fails the whole queued batch at once.

SQLite gets one writer thread that **group-commits**: the units of work queued while a
transaction was being written run together in the next one, each inside its own savepoint
(a failing unit rolls back alone), and their callers are answered only after the single
COMMIT. With ``synchronous=full`` that is one fsync per batch instead of one per consume,
and one thread keeps commit order equal to event-id order. Totals that every unit adds to
(the per-minute activity) are summed per batch with :func:`add_to_commit` and written once,
in the same transaction, just before its COMMIT: one hot row written once per batch instead
of once per consume, and nothing acknowledged that is not in the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

import peewee
from peewee import Database, PostgresqlDatabase, SqliteDatabase
from playhouse.db_url import connect, parse

from . import models
from .config import ConfigError
from .errors import DomainError
from .migrations import migrate

log = logging.getLogger(__name__)
T = TypeVar("T")


class DatabaseError(DomainError):
    """The database cannot serve this call now; answered 503 with Retry-After."""

    status = 503
    code = "database_unavailable"
    retry_after = 2
    #: What a client is told; ``message`` (driver text, host, port) goes to the log only.
    public_message = "the database is unavailable; retry later"

    def __init__(self, message: str):
        super().__init__(message, headers={"Retry-After": str(self.retry_after)})


class DatabaseUnavailable(DatabaseError):
    """Unreachable, restarting, hung or too slow (a timeout)."""


class DatabaseBusy(DatabaseError):
    """SQLite: another process held the lock for longer than ``database.busy_timeout``."""

    code = "database_busy"
    retry_after = 1
    public_message = "the database is busy; retry"


def _is_busy(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "database is locked" in text or "database is busy" in text


class _Postgres(PostgresqlDatabase):
    """Counts statements and COMMITs per thread, so a failed unit knows whether a retry on
    a fresh connection is safe (nothing can have been committed)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._counts = threading.local()

    def begin(self, isolation_level: Any = None) -> None:
        """Defer the ``BEGIN``: it is sent with the transaction's first statement, in the
        same round trip (psycopg2 sends a string of statements as one query). A transaction
        that runs nothing sends nothing."""
        if isolation_level is not None or self._isolation_level:
            super().begin(isolation_level)
            return
        if self.is_closed():  # now, as BEGIN would: connecting later resets the state
            self.connect()
        self._counts.begin = True

    def execute_sql(self, sql: str, params: Any = None) -> Any:
        self._counts.statements = getattr(self._counts, "statements", 0) + 1
        if getattr(self._counts, "begin", False):
            self._counts.begin = False
            sql = "BEGIN; " + sql
        return super().execute_sql(sql, params)

    def commit(self) -> None:
        if getattr(self._counts, "begin", False):  # nothing ran: nothing to commit
            self._counts.begin = False
            return
        self._counts.commits = getattr(self._counts, "commits", 0) + 1
        super().commit()

    def rollback(self) -> None:
        if getattr(self._counts, "begin", False):
            self._counts.begin = False
            return
        super().rollback()

    def progress(self) -> tuple[int, int]:
        return getattr(self._counts, "statements", 0), getattr(self._counts, "commits", 0)

    def connection_dead(self) -> bool:
        conn = self._state.conn
        return conn is None or bool(getattr(conn, "closed", 0))

    def discard_connection(self) -> None:
        """Forget this thread's connection (it is broken: closing it may fail too)."""
        self._counts.begin = False
        conn, self._state.conn = self._state.conn, None
        self._state.reset()
        if conn is not None:
            with contextlib.suppress(Exception):  # already broken
                conn.close()


def sqlite_path(url: str) -> str:
    """The file of ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``, as
    playhouse reads them; :class:`ConfigError` for an in-memory or empty one."""
    path = url.removeprefix("sqlite:").removeprefix("//")
    path = path[1:] if path.startswith("/") else path
    if not path or path == ":memory:":
        raise ConfigError("database.url: an SQLite database needs a file path")
    return path


def open_database(
    url: str,
    synchronous: str = "full",
    *,
    busy_timeout: float = 2.0,
    connect_timeout: float = 3.0,
    statement_timeout: float = 5.0,
) -> Database:
    """Connect by URL; for SQLite create the file's directory and set the pragmas."""
    if url.startswith("sqlite:"):
        path = sqlite_path(url)
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
                "busy_timeout": int(busy_timeout * 1000),
            },
            check_same_thread=False,
            # Take the write lock at BEGIN: a deferred transaction that must upgrade its
            # lock fails at once with "database is locked" instead of waiting.
            lock_type="IMMEDIATE",
        )
    if url.startswith(("postgres://", "postgresql://")):
        try:
            import psycopg2  # noqa: F401 - only checks that the driver is installed
        except ImportError:
            raise ConfigError(
                "database.url: PostgreSQL needs the psycopg2 driver "
                "(pip install 'quotaserver[postgres]')"
            ) from None
        params = parse(url, unquote_password=True, unquote_user=True)
        database = params.pop("database")
        return _Postgres(
            database,
            connect_timeout=max(1, round(connect_timeout)),
            options=f"-c statement_timeout={int(statement_timeout * 1000)}",
            # A peer that vanished without a FIN is noticed in about 10 s.
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=2,
            **params,
        )
    try:
        return connect(url)
    except (RuntimeError, ImportError) as exc:
        raise ConfigError(f"database.url: {exc}") from None
    except ValueError:
        raise ConfigError("database.url: unsupported database URL") from None


_batch = threading.local()


def add_to_commit(write: Callable[[dict], None], key: Any, values: tuple[int, ...]) -> bool:
    """Add ``values`` to ``key``'s totals, written by ``write(totals)`` just before this
    thread's group commit; False if no group commit is open (write them yourself).

    Sums of a unit that fails are dropped with its savepoint; a batch that fails drops all.
    """
    unit = getattr(_batch, "unit", None)
    if unit is None:
        return False
    _add(unit.setdefault(write, {}), key, values)
    return True


def _add(totals: dict, key: Any, values: tuple[int, ...]) -> None:
    old = totals.get(key)
    totals[key] = values if old is None else tuple(a + b for a, b in zip(old, values, strict=True))


def _merge(into: dict, unit: dict) -> None:
    for write, totals in unit.items():
        target = into.setdefault(write, {})
        for key, values in totals.items():
            _add(target, key, values)


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

    def submit_async(self, fn: Callable[[], Any]) -> asyncio.Future:
        """Like :meth:`submit`, answered on the calling event loop with one wake-up per
        batch for all its units there (not a thread-safe call per unit). A unit whose
        future is cancelled before it starts is skipped."""
        future = asyncio.get_running_loop().create_future()
        self._queue.put((future, fn))
        return future

    def shutdown(self) -> None:
        """Finish everything queued, close the connection, stop the thread."""
        self._queue.put(None)
        self._thread.join()

    def _loop(self) -> None:
        models.database_proxy.bind_thread(self.db)  # this store's models, on this thread
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

    def _run(self, batch: list[tuple[Any, Callable[[], Any]]]) -> None:
        outcomes: list[tuple[Any, bool, Any]] = []
        try:
            with self.db.atomic():  # BEGIN IMMEDIATE: waits busy_timeout for the lock
                totals: dict = {}
                for future, fn in batch:
                    if _start(future):
                        self._run_unit(future, fn, outcomes, totals)
                for write, values in totals.items():
                    write(values)
        except BaseException as exc:  # nothing of this batch was committed
            outcomes = _failed(batch, outcomes, exc)
        _answer(outcomes)  # only now: every result handed out has been committed

    def _run_unit(self, future: Any, fn: Callable[[], Any], outcomes: list, totals: dict) -> None:
        """One unit in a savepoint of the batch's transaction; its outcome is appended."""
        execute = self.db.execute_sql
        # One fixed savepoint name (peewee's atomic() draws a uuid4 for each); nested
        # units of peewee's own still work inside it.
        execute("SAVEPOINT unit")
        _batch.unit = {}
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            _batch.unit = None
            execute("ROLLBACK TO SAVEPOINT unit")
            execute("RELEASE SAVEPOINT unit")
            outcomes.append((future, False, exc))
            if _is_busy(exc):
                # Every later unit would wait busy_timeout again: give up on the whole
                # batch (rolled back by the caller) and answer at once.
                raise
            return
        finally:
            unit, _batch.unit = getattr(_batch, "unit", None), None
        execute("RELEASE SAVEPOINT unit")
        if unit:
            _merge(totals, unit)
        outcomes.append((future, True, result))


def _failed(batch: list, outcomes: list, exc: BaseException) -> list:
    """The outcomes of a batch whose transaction failed: a unit that raised keeps its own
    error (but a busy one), every other started unit gets the batch's error."""
    error: BaseException = exc
    if _is_busy(exc):
        error = DatabaseBusy("the database is locked by another process; retry")
    else:
        log.exception("group commit failed")
    answered = {id(f) for f, ok, v in outcomes if not ok and not _is_busy(v)}
    kept = [(f, False, v) for f, ok, v in outcomes if id(f) in answered]
    for future, _fn in batch:
        if id(future) in answered:
            continue
        if not isinstance(future, Future):
            kept.append((future, False, error))  # (_settle skips cancelled ones)
        elif not future.done() and (future.running() or future.set_running_or_notify_cancel()):
            kept.append((future, False, error))
    return kept


def _answer(outcomes: list[tuple[Any, bool, Any]]) -> None:
    """Thread futures at once; asyncio futures with one wake-up per loop."""
    loops: dict[asyncio.AbstractEventLoop, list] = {}
    for future, ok, value in outcomes:
        if not isinstance(future, Future):
            loops.setdefault(future.get_loop(), []).append((future, ok, value))
        elif ok:
            future.set_result(value)
        else:
            future.set_exception(value)
    for loop, answers in loops.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
            loop.call_soon_threadsafe(_settle, answers)


def _start(future: Any) -> bool:
    """Whether a queued unit should run (its caller has not given up on it)."""
    if isinstance(future, Future):
        return future.set_running_or_notify_cancel()
    return not future.cancelled()


def _settle(answers: list[tuple[asyncio.Future, bool, Any]]) -> None:
    """On the loop: hand each unit's committed result (or error) to its caller."""
    for future, ok, value in answers:
        if future.cancelled():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


def _select_one() -> None:
    database = models.database_proxy.obj
    database.execute_sql("SELECT 1").fetchone()


class Store:
    """Owns the database connection and the worker threads that use it.

    ``available``, ``last_error`` and ``last_error_at`` say how the last calls went: health
    reports them, and the transitions are logged once each (lost, recovered).
    """

    def __init__(
        self,
        url: str,
        synchronous: str = "full",
        pool_size: int = 4,
        *,
        busy_timeout: float = 2.0,
        connect_timeout: float = 3.0,
        statement_timeout: float = 5.0,
    ):
        self.url = url
        self.db = open_database(
            url,
            synchronous,
            busy_timeout=busy_timeout,
            connect_timeout=connect_timeout,
            statement_timeout=statement_timeout,
        )
        self.is_sqlite = isinstance(self.db, SqliteDatabase)
        models.database_proxy.initialize(self.db)
        # A caller stops waiting for PostgreSQL after a connect and a statement timeout
        # (and the retry's connect), whatever the server does: a hung server gets 503s.
        self.call_timeout = 2 * connect_timeout + statement_timeout + 1
        self.available = True
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.errors = 0
        #: Called with each DatabaseError (the app counts them in its metrics).
        self.on_error: Callable[[DatabaseError], None] | None = None
        self._committer: GroupCommitter | None = None
        self._executor: ThreadPoolExecutor | None = None
        #: Threads (each with its connection) for writes and for reads; health shows them.
        self.pool = {
            "writers": 1 if self.is_sqlite else pool_size,
            "readers": max(2, pool_size // 2),
        }
        if self.is_sqlite:
            self._committer = GroupCommitter(self.db)
        else:
            self._executor = ThreadPoolExecutor(
                max_workers=pool_size,
                thread_name_prefix="db",
                initializer=models.database_proxy.bind_thread,
                initargs=(self.db,),
            )
        # Reads of the admin pages, history and replay run on their own threads and
        # connections: a long one never queues a consume behind it (SQLite WAL readers do
        # not block the writer) and, on PostgreSQL, can never take every connection.
        self._readers = ThreadPoolExecutor(
            max_workers=self.pool["readers"],
            thread_name_prefix="db-read",
            initializer=models.database_proxy.bind_thread,
            initargs=(self.db,),
        )
        self._read_only = threading.local()

    @classmethod
    def from_config(cls, config: Any) -> Store:
        return cls(
            config["database.url"],
            config["database.sqlite_synchronous"],
            config["database.pool_size"],
            busy_timeout=config["database.busy_timeout"],
            connect_timeout=config["database.connect_timeout"],
            statement_timeout=config["database.statement_timeout"],
        )

    def migrate(self, *then: Callable[[], None]) -> int:
        """Migrate, then run ``then`` (seeding) under the same lock (see :func:`migrate`)."""
        return migrate(self.db, *then)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on a database worker thread and return its result (once committed).

        Raises :class:`DatabaseUnavailable` or :class:`DatabaseBusy` when the database
        cannot serve the call; any other exception is ``fn``'s own.
        """
        return await self._outcome(functools.partial(fn, *args, **kwargs))

    async def _outcome(self, call: Callable[[], T], submitted: Any = None) -> T:
        """Run ``call`` (or wait for ``submitted``, the group committer's future for it)
        and translate database failures (see :meth:`run`)."""
        try:
            if self._committer is not None:
                if submitted is None:
                    submitted = self._committer.submit_async(call)
                result = await submitted
            else:
                loop = asyncio.get_running_loop()
                future = loop.run_in_executor(self._executor, self._guarded, call)
                try:
                    async with asyncio.timeout(self.call_timeout):
                        result = await future
                except TimeoutError:
                    if not future.cancelled():
                        raise  # fn's own TimeoutError
                    raise DatabaseUnavailable(
                        f"the database did not answer within {self.call_timeout:g} s"
                    ) from None
        except DatabaseError as exc:
            self._failed(exc)
            raise
        except (peewee.OperationalError, peewee.InterfaceError) as exc:
            text = str(exc).lower()
            if not self.is_sqlite or not any(
                s in text for s in ("unable to open", "disk i/o", "readonly", "disk is full")
            ):
                raise
            error = DatabaseUnavailable(f"the database cannot be written: {exc}")
            self._failed(error)
            raise error from None
        if not self.available:
            self.available = True
            log.warning("database available again")
        return result

    async def read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run read-only ``fn`` in one snapshot on a reader thread (never the writer's queue).

        Same errors as :meth:`run`; ``fn`` must not write (SQLite readers are query-only).
        """
        call = functools.partial(self._snapshot, functools.partial(fn, *args, **kwargs))
        if not self.is_sqlite:
            call = functools.partial(self._guarded, call)
        future = asyncio.get_running_loop().run_in_executor(self._readers, call)
        try:
            async with asyncio.timeout(self.call_timeout):
                result = await future
        except TimeoutError:
            if not future.cancelled():
                raise
            error = DatabaseUnavailable(f"a read did not finish within {self.call_timeout:g} s")
            self._failed(error)
            raise error from None
        except DatabaseError as exc:
            self._failed(exc)
            raise
        except peewee.OperationalError as exc:
            if not _is_busy(exc):
                raise
            error = DatabaseBusy("the database is locked by another process; retry")
            self._failed(error)
            raise error from None
        return result

    def _snapshot(self, call: Callable[[], T]) -> T:
        db = self.db
        if self.is_sqlite:
            if db.is_closed() or not getattr(self._read_only, "set", False):
                db.connect(reuse_if_open=True)
                db.execute_sql("PRAGMA query_only = 1")
                self._read_only.set = True
            # DEFERRED: a WAL read snapshot that never takes (or waits for) the write lock.
            with db.atomic("DEFERRED"):
                return call()
        with db.atomic():
            db.execute_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            return call()

    def _failed(self, exc: DatabaseError) -> None:
        self.errors += 1
        if self.on_error is not None:
            self.on_error(exc)
        self.last_error, self.last_error_at = exc.message, time.time()
        if self.available:
            self.available = False
            log.error("database unavailable: %s", exc.message)

    def _guarded(self, call: Callable[[], T]) -> T:
        """PostgreSQL: run ``call`` on this thread's connection, replacing a dead one."""
        db = self.db
        assert isinstance(db, _Postgres)
        reused = db._state.conn is not None
        if reused and db.connection_dead():
            db.discard_connection()
            reused = False
        statements, commits = db.progress()
        try:
            return call()
        except (peewee.OperationalError, peewee.InterfaceError) as exc:
            if not db.connection_dead():
                if "statement timeout" in str(exc):
                    raise DatabaseUnavailable("a database statement timed out") from None
                raise
            db.discard_connection()
            ran, committed = db.progress()
            # A connection that died while idle (a server restart) fails the unit's first
            # statement, before anything could commit: run it again on a new connection.
            if not (reused and committed == commits and ran - statements <= 1):
                raise DatabaseUnavailable(f"lost the database connection: {exc}") from None
        log.info("database connection lost while idle; retrying on a new connection")
        try:
            return call()
        except (peewee.OperationalError, peewee.InterfaceError) as exc:
            if not db.connection_dead():
                raise
            db.discard_connection()
            raise DatabaseUnavailable(f"the database is unreachable: {exc}") from None

    async def run_committed(self, fn: Callable[[], T], after: Callable[[T], Any]) -> T:
        """Run ``fn``; once it has committed, call ``after(result)`` on the loop.

        ``after`` runs even if the awaiting caller is cancelled meanwhile (an emitter timing
        out, a shutdown): a committed event must still be published.
        """

        def committed(done: asyncio.Future) -> None:
            if not done.cancelled() and done.exception() is None:
                after(done.result())

        if self._committer is not None:
            # The committer's own future, shielded: no task of its own per call.
            submitted = self._committer.submit_async(fn)
            submitted.add_done_callback(committed)
            return await self._outcome(fn, asyncio.shield(submitted))
        future = asyncio.ensure_future(self.run(fn))
        future.add_done_callback(committed)
        return await asyncio.shield(future)

    async def check(self) -> bool:
        """A real round trip through the writer path (SQLite takes the write lock)."""
        try:
            await self.run(_select_one)
            return True
        except DatabaseError:
            return False

    def health(self) -> dict[str, Any]:
        return {
            "reachable": self.available,
            "pool": self.pool,
            "errors": self.errors,
            "last_error": self.last_error,
            "last_error_at": (
                datetime.fromtimestamp(self.last_error_at, UTC).isoformat().replace("+00:00", "Z")
                if self.last_error_at
                else None
            ),
        }

    def close(self, timeout: float = 5.0) -> None:
        """Wait for queued work (so no write is cut short), then close connections.

        PostgreSQL work still stuck after ``timeout`` (a hung server) is abandoned.
        """
        if self._committer is not None:
            self._committer.shutdown()
        else:
            try:
                # Connections are per thread: close the worker's own before stopping it.
                self._executor.submit(self._close_connection).result(timeout=timeout)
                clean = True
            except Exception:  # noqa: BLE001 - a hung or dead server: nothing to wait for
                log.warning("database connections not closed cleanly")
                clean = False
            self._executor.shutdown(wait=clean, cancel_futures=True)
        # Reads finish within call_timeout; a hung PostgreSQL's are abandoned.
        self._readers.shutdown(wait=self.is_sqlite or self.available, cancel_futures=True)
        self._close_connection()

    def _close_connection(self) -> None:
        if isinstance(self.db, _Postgres):
            self.db.discard_connection()
        elif not self.db.is_closed():
            self.db.close()
