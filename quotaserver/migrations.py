"""Schema migrations: numbered, append-only, each written out as the SQL it runs.

``migrate`` applies the pending ones in order, each in its own transaction, under one lock
(instances started together on an empty database take turns), then seeds. Migrations 1-3
run the statements frozen in :mod:`quotaserver.frozen_schema`; the later ones are written
here. ``tests/test_store.py`` (SQLite) and ``tests/test_postgres.py`` compare a freshly
migrated database with the models.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime

import peewee
from peewee import Database, PostgresqlDatabase

from . import models
from .config import ConfigError
from .frozen_schema import FROZEN

log = logging.getLogger(__name__)


def _frozen(db: Database, version: int) -> None:
    """Run migration ``version``'s written-out statements (quotaserver.frozen_schema)."""
    dialect = "postgresql" if isinstance(db, PostgresqlDatabase) else "sqlite"
    for sql in FROZEN[version][dialect]:
        db.execute_sql(sql)


def _migration_1(db: Database) -> None:
    """Initial schema."""
    _frozen(db, 1)


def _migration_2(db: Database) -> None:
    """API tokens (digests only) and token/session revocations."""
    _frozen(db, 2)


def _migration_3(db: Database) -> None:
    """Maintained daily utilisation per user, and indexes for O(page) admin lists."""
    _frozen(db, 3)
    # Prefix search compares code points: PostgreSQL's "C" collation, SQLite's default.
    collate = ' COLLATE "C"' if isinstance(db, PostgresqlDatabase) else ""
    peak, user = models.DailyPeak._meta.table_name, models.User._meta.table_name
    violation = models.Violation._meta.table_name
    for sql in (
        f'CREATE INDEX IF NOT EXISTS "{peak}_rank" ON "{peak}" ("day", "rank", "username")',
        f'CREATE INDEX IF NOT EXISTS "{user}_username_lower" '
        f'ON "{user}" ((lower("username")){collate}, "username")',
        f'CREATE INDEX IF NOT EXISTS "{violation}_user_created" '
        f'ON "{violation}" ("user_id", "created_at")',
    ):
        db.execute_sql(sql)


def _migration_4(db: Database) -> None:
    """Index for the alerts list's keyset order (most recently changed first)."""
    alert = models.Alert._meta.table_name
    db.execute_sql(
        f'CREATE INDEX IF NOT EXISTS "{alert}_updated" ON "{alert}" ("updated_at", "id")'
    )


def _migration_5(db: Database) -> None:
    """Credentials as cluster state: the credentials version and shared sign-in codes."""
    for sql in (
        'CREATE TABLE IF NOT EXISTS "auth_state" '
        '("id" INTEGER NOT NULL PRIMARY KEY, "version" BIGINT NOT NULL)',
        'INSERT INTO "auth_state" ("id", "version") VALUES (1, 0) ON CONFLICT DO NOTHING',
        'CREATE TABLE IF NOT EXISTS "login_code" ("code_hash" VARCHAR(64) NOT NULL PRIMARY KEY, '
        '"token_digest" VARCHAR(64) NOT NULL, "expires_at" BIGINT NOT NULL)',
    ):
        db.execute_sql(sql)


# Tables whose ids grow without bound (one row per event, violation, counter window or
# audited change): 64-bit on PostgreSQL. SQLite's INTEGER PRIMARY KEY is 64-bit already.
_GROWING_IDS = ("event", "violation", "usage", "audit_log")


def _migration_6(db: Database) -> None:
    """64-bit ids on PostgreSQL for the tables that grow without bound."""
    if not isinstance(db, PostgresqlDatabase):
        return
    for table in _GROWING_IDS:
        db.execute_sql(f'ALTER TABLE "{table}" ALTER COLUMN "id" TYPE BIGINT')
        db.execute_sql(f'ALTER SEQUENCE "{table}_id_seq" AS BIGINT')


def _migration_7(db: Database) -> None:
    """Idempotency keys: the stored answer and effect of each keyed consume, per token."""
    # Explicit: this table and its two indexes, whatever later versions of the model add.
    table = models.IdempotencyKey._meta.table_name
    text = "TEXT"
    # One row per keyed consume: 64-bit ids on PostgreSQL, as migration 6 gives the others.
    serial = (
        "BIGSERIAL PRIMARY KEY" if isinstance(db, PostgresqlDatabase) else "INTEGER PRIMARY KEY"
    )
    stamp = "TIMESTAMP" if isinstance(db, PostgresqlDatabase) else "DATETIME"
    db.execute_sql(
        f'CREATE TABLE IF NOT EXISTS "{table}" ("id" {serial}, '
        f'"owner" VARCHAR(32) NOT NULL, "key" VARCHAR(255) NOT NULL, '
        f'"fingerprint" VARCHAR(64) NOT NULL, "status" INTEGER NOT NULL, '
        f'"response" {text} NOT NULL, "username" VARCHAR(255) NOT NULL, '
        f'"command_type" VARCHAR(64) NOT NULL, "counted" BIGINT NOT NULL DEFAULT 0, '
        f'"windows" {text} NOT NULL DEFAULT \'{{}}\', "refund" {text}, '
        f'"created_at" {stamp} NOT NULL, "expires_at" {stamp} NOT NULL)'
    )
    db.execute_sql(
        f'CREATE UNIQUE INDEX IF NOT EXISTS "{table}_owner_key" ON "{table}" ("owner", "key")'
    )
    db.execute_sql(f'CREATE INDEX IF NOT EXISTS "{table}_expires_at" ON "{table}" ("expires_at")')


def _migration_8(db: Database) -> None:
    """Plugin state that outlives a restart (plugin, key, JSON value)."""
    stamp = "TIMESTAMP" if isinstance(db, PostgresqlDatabase) else "DATETIME"
    db.execute_sql(
        'CREATE TABLE IF NOT EXISTS "plugin_data" ("plugin" VARCHAR(64) NOT NULL, '
        f'"key" VARCHAR(128) NOT NULL, "value" TEXT NOT NULL, "updated_at" {stamp} NOT NULL, '
        'PRIMARY KEY ("plugin", "key"))'
    )


def _migration_9(db: Database) -> None:
    """Consumes refused for load: per minute, and per user and day."""
    minute, day = models.LoadRefusalMinute._meta.table_name, models.LoadRefusalDay._meta.table_name
    user = models.User._meta.table_name
    # Written out (not created from the models) so this step stays what it is when the
    # models change later.
    for sql in (
        f'CREATE TABLE IF NOT EXISTS "{minute}" ('
        '"minute" BIGINT NOT NULL PRIMARY KEY, "refused" BIGINT NOT NULL DEFAULT 0)',
        f'CREATE TABLE IF NOT EXISTS "{day}" ('
        f'"user_id" INTEGER NOT NULL REFERENCES "{user}" ("id") ON DELETE CASCADE, '
        '"day" BIGINT NOT NULL, "refused" BIGINT NOT NULL DEFAULT 0, '
        'PRIMARY KEY ("user_id", "day"))',
        f'CREATE INDEX IF NOT EXISTS "{day}_day" ON "{day}" ("day")',
    ):
        db.execute_sql(sql)


def _migration_10(db: Database) -> None:
    """The load chart's samples, per instance (quotaserver.load_log)."""
    table = models.LoadPoint._meta.table_name
    db.execute_sql(
        f'CREATE TABLE IF NOT EXISTS "{table}" ("instance" VARCHAR(255) NOT NULL, '
        '"t" DOUBLE PRECISION NOT NULL, "cpu_percent" REAL NOT NULL, '
        '"memory_percent" REAL NOT NULL, "throttle_factor" REAL NOT NULL, '
        'PRIMARY KEY ("instance", "t"))'
    )


# Append-only: (version, function). Never edit a released migration; add a new one. Every
# migration's statements are written out (1-3 in quotaserver.frozen_schema), so a change to
# a model needs its own migration; tests/test_store.py compares a fresh database with the
# models.
MIGRATIONS: tuple[tuple[int, Callable[[Database], None]], ...] = (
    (1, _migration_1),
    (2, _migration_2),
    (3, _migration_3),
    (4, _migration_4),
    (5, _migration_5),
    (6, _migration_6),
    (7, _migration_7),
    (8, _migration_8),
    (9, _migration_9),
    (10, _migration_10),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]  # what this code knows; a newer database is refused


class SchemaTooNew(ConfigError):
    """The database was migrated by a newer quotaserver than this one (exit 2)."""

    def __init__(self, found: int):
        from . import __version__

        super().__init__(
            f"database.url: the database's schema is version {found}, newer than this "
            f"quotaserver ({__version__}) knows (schema version {SCHEMA_VERSION}); run the "
            "newer version, or see docs/operations.md (upgrades)"
        )
        self.found = found


# The key of the PostgreSQL advisory lock held while migrating and seeding (any constant
# distinct from events._EVENT_LOCK): instances started together take turns.
_MIGRATION_LOCK = 0x71756F7462


def migrate(db: Database, *then: Callable[[], None]) -> int:
    """Apply pending migrations in order, each in its own transaction, then run ``then``
    (the seeding), all under one lock so that instances started together on an empty
    database take turns (PostgreSQL: an advisory lock; SQLite: its write lock, since the
    group committer runs this in one transaction). Returns the schema version; raises
    :class:`SchemaTooNew` for a database migrated by a newer version."""
    postgres = isinstance(db, PostgresqlDatabase)
    if postgres:
        db.execute_sql("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
    try:
        version = _migrate(db)
        for step in then:
            step()
        return version
    finally:
        if postgres:
            with contextlib.suppress(peewee.PeeweeException):  # the connection is gone
                db.execute_sql("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))


def _migrate(db: Database) -> int:
    db.create_tables([models.SchemaVersion])
    # Each applied step has its row: a step numbered below one already applied (merged from
    # a branch that was in flight meanwhile) still runs once.
    applied = {row.version for row in models.SchemaVersion.select(models.SchemaVersion.version)}
    version = max(applied, default=0)
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(version)
    for number, step in MIGRATIONS:
        if number in applied:
            continue
        with db.atomic():
            step(db)
            models.SchemaVersion.create(
                version=number, applied_at=datetime.now(UTC).replace(tzinfo=None)
            )
        log.info("applied migration %d: %s", number, (step.__doc__ or "").strip())
        version = max(version, number)
    return version
