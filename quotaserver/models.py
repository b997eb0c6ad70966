"""peewee models. Portable SQL only: the same models run on SQLite and PostgreSQL.

Times are stored as naive UTC datetimes; window keys as epoch seconds (integers compare
the same way on every database).
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from typing import Any

from peewee import (
    AutoField,
    BigIntegerField,
    CharField,
    CompositeKey,
    DatabaseProxy,
    DateTimeField,
    DoubleField,
    FloatField,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
)


class StoreProxy(DatabaseProxy):
    """The models' database: the one of the :class:`quotaserver.db.Store` whose thread is
    running (each store binds its own threads), elsewhere the one initialised last.

    So two applications in one process (tests, an embedding program) each work on their own
    database; a process with one store behaves as with a plain ``DatabaseProxy``.
    """

    __slots__ = ("_local",)

    def __init__(self) -> None:
        object.__setattr__(self, "_local", threading.local())
        super().__init__()

    def bind_thread(self, db: Any) -> None:
        """Make ``db`` the database of the calling thread (a store's worker threads)."""
        self._local.db = db

    @property  # type: ignore[override]
    def obj(self) -> Any:
        bound = getattr(self._local, "db", None)
        return bound if bound is not None else _DEFAULT.__get__(self, type(self))

    def __setattr__(self, attr: str, value: Any) -> None:
        if attr == "obj":  # initialize(): the default for threads no store bound
            _DEFAULT.__set__(self, value)
        elif attr in ("_callbacks", "_Model"):
            object.__setattr__(self, attr, value)
        else:
            raise AttributeError("Cannot set attribute on proxy.")


_DEFAULT = DatabaseProxy.__dict__["obj"]  # the slot that holds the process-wide default
database_proxy = StoreProxy()

GLOBAL_SCOPE = ""  # QuotaRule.scope of the global default rules


def naive_utc(ts: datetime) -> datetime:
    return ts.astimezone(UTC).replace(tzinfo=None)


def aware(ts: datetime) -> datetime:
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts


class BaseModel(Model):
    class Meta:
        database = database_proxy
        legacy_table_names = False


class SchemaVersion(BaseModel):
    version = IntegerField(primary_key=True)
    applied_at = DateTimeField()


class User(BaseModel):
    id = AutoField()
    username = CharField(max_length=255, unique=True)
    created_at = DateTimeField()


class QuotaRule(BaseModel):
    """One limit: (scope, command type, period) -> limit, NULL meaning unlimited.

    ``scope`` is ``""`` for the global default, else the user's id as text; a user's rule
    overrides the global one for that period only, and a missing user rule inherits.
    """

    id = AutoField()
    scope = CharField(max_length=32, default=GLOBAL_SCOPE)
    user = ForeignKeyField(User, null=True, on_delete="CASCADE", backref="rules")
    command_type = CharField(max_length=64)
    period = CharField(max_length=16)
    limit = BigIntegerField(null=True)
    updated_at = DateTimeField()

    class Meta:
        indexes = ((("scope", "command_type", "period"), True),)


class Usage(BaseModel):
    """The counter of one (user, command type, period window)."""

    id = AutoField()
    user = ForeignKeyField(User, on_delete="CASCADE", backref="usage")
    command_type = CharField(max_length=64)
    period = CharField(max_length=16)
    window_start = BigIntegerField()
    used = BigIntegerField(default=0)

    class Meta:
        indexes = (
            (("user", "command_type", "period", "window_start"), True),
            (("period", "window_start"), False),
        )


class Violation(BaseModel):
    id = AutoField()
    user = ForeignKeyField(User, on_delete="CASCADE", backref="violations")
    command_type = CharField(max_length=64)
    period = CharField(max_length=16)
    limit = BigIntegerField()
    attempted = BigIntegerField()
    message = TextField()
    created_at = DateTimeField(index=True)


class Event(BaseModel):
    """Append-only outbox; ``id`` is the real-time sequence number (``seq``)."""

    id = AutoField()
    type = CharField(max_length=64)
    data = TextField()
    created_at = DateTimeField()

    def payload(self) -> dict[str, Any]:
        return json.loads(self.data)


class Alert(BaseModel):
    id = AutoField()
    rule = CharField(max_length=64)
    severity = CharField(max_length=16)
    user = ForeignKeyField(User, null=True, on_delete="CASCADE", backref="alerts")
    message = TextField()
    action_needed = TextField(default="")
    count = IntegerField(default=1)
    status = CharField(max_length=16, default="open", index=True)
    # "rule:user:day" while the alert is not resolved, NULL afterwards: the unique index
    # keeps one live alert per (rule, user, day) on every database.
    dedupe_key = CharField(max_length=160, null=True, unique=True)
    created_at = DateTimeField(index=True)
    updated_at = DateTimeField()
    acknowledged_by = CharField(max_length=128, null=True)
    acknowledged_at = DateTimeField(null=True)
    resolved_by = CharField(max_length=128, null=True)
    resolved_at = DateTimeField(null=True)


class AuditLog(BaseModel):
    id = AutoField()
    actor = CharField(max_length=128)
    action = CharField(max_length=64)
    target = CharField(max_length=255)
    details = TextField(default="{}")
    created_at = DateTimeField(index=True)


class Activity(BaseModel):
    """Per-minute totals that feed the dashboard charts (maintained with each decision)."""

    minute = BigIntegerField(primary_key=True)  # epoch seconds of the minute's start
    commands = BigIntegerField(default=0)
    violations = BigIntegerField(default=0)


class ApiToken(BaseModel):
    """A token created through the admin API, or the revocation of any token.

    Only the SHA-256 digest is stored. A row with ``revoked_at`` set never authenticates
    again, whatever declared the token (API, config, environment, first-run file).
    """

    id = AutoField()
    digest = CharField(max_length=64, unique=True)
    name = CharField(max_length=64)
    role = CharField(max_length=16)
    source = CharField(max_length=16, default="api")  # api | config | env | first-run | runtime
    created_by = CharField(max_length=128)
    created_at = DateTimeField()
    revoked_by = CharField(max_length=128, null=True)
    revoked_at = DateTimeField(null=True)


class RevokedSession(BaseModel):
    """A logged-out browser session, kept until the cookie would have expired anyway."""

    session_id = CharField(max_length=32, primary_key=True)
    expires_at = DateTimeField(index=True)


class DailyPeak(BaseModel):
    """A user's highest utilisation of a daily limit today, maintained with each decision.

    ``rank`` is minus the percent (1 when every command type the user used is unlimited),
    so that one ascending index serves "highest first, then by name" with keyset paging;
    the user name is copied here for the same reason. Rows of earlier days are stale, not
    deleted: a row counts only when ``day`` is today's daily window key.
    """

    user = ForeignKeyField(User, primary_key=True, on_delete="CASCADE")
    day = BigIntegerField()
    rank = FloatField()
    username = CharField(max_length=255)


class LoadRefusalMinute(BaseModel):
    """Consumes refused for load (throttle factor 0) per minute: the third series of the
    commands chart, next to ``Activity``'s admitted and denied (a table of its own, created
    by migration 9, so that migration 1 keeps creating ``Activity`` as it was)."""

    minute = BigIntegerField(primary_key=True)  # epoch seconds of the minute's start
    refused = BigIntegerField(default=0)


class LoadPoint(BaseModel):
    """A load sample of one instance: the dashboard's load chart, read back after a restart
    (quotaserver.load_log writes them every few seconds and keeps the last 15 minutes)."""

    instance = CharField(max_length=255)
    t = DoubleField()  # time.time() of the sample
    cpu_percent = FloatField()
    memory_percent = FloatField()
    throttle_factor = FloatField()

    class Meta:
        primary_key = CompositeKey("instance", "t")


class LoadRefusalDay(BaseModel):
    """Consumes of a known user refused for load on one day (the daily window's key)."""

    user = ForeignKeyField(User, on_delete="CASCADE")
    day = BigIntegerField()
    refused = BigIntegerField(default=0)

    class Meta:
        primary_key = CompositeKey("user", "day")


class AuthState(BaseModel):
    """One row (``id`` 1): the version of the credentials, bumped in the transaction of
    every token creation, revocation and logout. Every process compares it with the
    version it loaded and reloads its credentials when they differ (quotaserver.credential_sync)."""

    id = IntegerField(primary_key=True)
    version = BigIntegerField(default=0)


class LoginCode(BaseModel):
    """A one-time sign-in code (its SHA-256 only), shared by every worker and instance:
    redeeming deletes the row, so a code works once in total."""

    code_hash = CharField(max_length=64, primary_key=True)
    token_digest = CharField(max_length=64)
    expires_at = BigIntegerField()  # epoch seconds


class IdempotencyKey(BaseModel):
    """The stored effect and answer of one keyed write (``Idempotency-Key``), per token.

    Written in the transaction that counts the consume, so a key exists exactly when its
    effect does. One row per keyed consume, not per HTTP request: a batch item carries its
    own key and gets its own row. ``windows`` (JSON: period -> window key) and ``counted``
    say what a refund may give back; ``refund`` is the refund's stored answer (given once).
    """

    id = AutoField()
    owner = CharField(max_length=32)  # Identity.token_id: one service cannot replay another's
    key = CharField(max_length=255)
    fingerprint = CharField(max_length=64)  # SHA-256 of the normalised request
    status = IntegerField()
    response = TextField()
    username = CharField(max_length=255)
    command_type = CharField(max_length=64)
    counted = BigIntegerField(default=0)  # 0: the consume was refused and counted nothing
    windows = TextField(default="{}")
    refund = TextField(null=True)
    created_at = DateTimeField()
    expires_at = DateTimeField(index=True)

    class Meta:
        indexes = ((("owner", "key"), True),)


class PluginData(BaseModel):
    """A plugin's small state that outlives a restart (``app.plugin_storage``): a JSON
    value per (plugin, key), such as the last event a notification target received."""

    plugin = CharField(max_length=64)
    key = CharField(max_length=128)
    value = TextField()
    updated_at = DateTimeField()

    class Meta:
        primary_key = CompositeKey("plugin", "key")


ALL_MODELS = (SchemaVersion, User, QuotaRule, Usage, Violation, Event, Alert, AuditLog, Activity)
# Added by migration 2 (kept out of ALL_MODELS so that migration 1 stays what it was).
AUTH_MODELS = (ApiToken, RevokedSession)
# Added by migration 3.
SCALE_MODELS = (DailyPeak,)
# Added by migrations 9 and 10 (their own CREATE TABLE statements, not these definitions).
LOAD_MODELS = (LoadRefusalMinute, LoadRefusalDay, LoadPoint)
# Added by migration 5 (written out as SQL there).
CLUSTER_AUTH_MODELS = (AuthState, LoginCode)
# Added by migration 7.
IDEMPOTENCY_MODELS = (IdempotencyKey,)
# Added by migration 8 (written out as SQL there).
PLUGIN_MODELS = (PluginData,)
