"""Idempotency keys: a consume retried with its ``Idempotency-Key`` changes nothing and gets
the first answer again.

A service retries when it does not know whether a consume counted (a timeout, a 503, a
connection cut after the COMMIT). The key's row is written in the transaction that counts
the consume (:meth:`KeySQL.store`), so the key exists exactly when the effect does: after a
crash, a restart or on another instance sharing the database, a retry finds it and is
answered from it. One statement per keyed consume: an upsert that creates the row, or
replaces one whose TTL is over, and returns nothing when a live row holds the key; the
consume is then rolled back (:class:`KeyTaken`) and the stored answer read.

Keys are scoped by token (``owner`` is :attr:`Identity.token_id`): one service can neither
replay nor refund another's. A row per keyed consume, not per HTTP request, so a batch item
can carry its own key. ``quotas.idempotency_ttl`` bounds how long a key is remembered; the
retention job deletes expired rows (:func:`prune_expired`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from peewee import Database

from .errors import DomainError
from .models import IdempotencyKey, naive_utc

MAX_KEY_LENGTH = 255
HEADER = "Idempotency-Key"


class KeyInFlight(DomainError):
    """Another request with this key is still being decided (on this instance): retry."""

    status = 409
    code = "idempotency_key_in_flight"
    default_message = "a request with this Idempotency-Key is still in progress; retry"

    def __init__(self) -> None:
        super().__init__(headers={"Retry-After": "1"})


class KeyReused(DomainError):
    """The key was first used with another request body."""

    status = 422
    code = "idempotency_key_reused"
    default_message = "this Idempotency-Key was used with a different request"


class KeyTaken(Exception):
    """Raised inside a consume's transaction when a live row holds its key: rolls the
    consume back, after which the stored answer is read."""


def parse_key(value: str) -> str:
    """The key of an ``Idempotency-Key`` header: a structured-field string (``"abc"``, as
    the IETF draft writes it) or, as most clients send it, the bare text; 400 otherwise."""
    text = value.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1].replace('\\"', '"').replace("\\\\", "\\")
    if not 1 <= len(text) <= MAX_KEY_LENGTH or not (text.isascii() and text.isprintable()):
        raise DomainError(
            f"{HEADER} must be 1-{MAX_KEY_LENGTH} printable ASCII characters",
            code="invalid_idempotency_key",
        )
    return text


@dataclass(frozen=True, slots=True)
class RequestKey:
    """A key as the server stores it: who sent it, the key, and what it was sent with."""

    owner: str
    key: str
    fingerprint: str

    @classmethod
    def of(cls, owner: str, key: str, *request: Any) -> RequestKey:
        """``request`` is the normalised request (route, user, command type, count): a
        retry that spells the same request differently (count 1 left out) is the same."""
        digest = hashlib.sha256(json.dumps(request, ensure_ascii=False).encode()).hexdigest()
        return cls(owner, key, digest)


@dataclass(slots=True)
class StoredKey:
    id: int
    fingerprint: str
    status: int
    response: str
    username: str
    command_type: str
    counted: int
    windows: dict[str, int]
    refund: str | None


@dataclass(slots=True)
class Replay:
    """A stored answer given again (``Idempotent-Replayed: true``)."""

    status: int
    response: str  # the JSON body, byte for byte as first sent
    at: datetime  # now, for the headers' seconds-until-reset

    @property
    def body(self) -> dict[str, Any]:
        return json.loads(self.response)


class InFlight:
    """The keys this instance is deciding now: a second request with one gets 409 at once
    instead of queueing behind the first (another instance waits for the first's COMMIT in
    the database, then replays it)."""

    def __init__(self) -> None:
        self._keys: set[tuple[str, str]] = set()

    @contextmanager
    def hold(self, key: RequestKey) -> Iterator[None]:
        name = (key.owner, key.key)
        if name in self._keys:
            raise KeyInFlight()
        self._keys.add(name)
        try:
            yield
        finally:
            self._keys.discard(name)


def _q(name: str) -> str:
    return f'"{name}"'


class KeySQL:
    """The key table's statements, built once per database (like :class:`CounterSQL`)."""

    def __init__(self, db: Database):
        self.db = db
        p = db.param
        table = _q(IdempotencyKey._meta.table_name)
        self._stamp = IdempotencyKey._meta.fields["created_at"].db_value
        columns = (
            "owner", "key", "fingerprint", "status", "response", "username", "command_type",
            "counted", "windows", "created_at", "expires_at",
        )  # fmt: skip
        replaced = ", ".join(f"{_q(c)} = excluded.{_q(c)}" for c in columns[2:])
        # A row whose TTL is over is replaced (and its refund forgotten); a live one is
        # left alone and nothing is returned.
        self.sql_store = (
            f"INSERT INTO {table} ({', '.join(map(_q, columns))}) "
            f"VALUES ({', '.join([p] * len(columns))}) "
            f'ON CONFLICT ("owner", "key") DO UPDATE SET {replaced}, "refund" = NULL '
            f'WHERE {table}."expires_at" <= excluded."created_at" RETURNING "id"'
        )
        self.sql_find = (
            'SELECT "id", "fingerprint", "status", "response", "username", "command_type", '
            f'"counted", "windows", "refund" FROM {table} '
            f'WHERE "owner" = {p} AND "key" = {p} AND "expires_at" > {p}'
        )
        self.sql_refunded = f'UPDATE {table} SET "refund" = {p} WHERE "id" = {p}'

    def store(
        self,
        key: RequestKey,
        status: int,
        response: str,
        request: tuple[str, str, int],
        windows: dict[str, int],
        now: datetime,
        ttl: float,
    ) -> None:
        """Record the key with its answer in the current transaction; :class:`KeyTaken` if
        a live row holds it (the caller's transaction must then roll back)."""
        username, command_type, counted = request
        row = self.db.execute_sql(
            self.sql_store,
            (
                key.owner, key.key, key.fingerprint, status, response, username, command_type,
                counted, json.dumps(windows), self._stamp(naive_utc(now)),
                self._stamp(naive_utc(now + timedelta(seconds=ttl))),
            ),
        ).fetchone()  # fmt: skip
        if row is None:
            raise KeyTaken()

    def find(self, owner: str, key: str, now: datetime) -> StoredKey | None:
        """The live row of ``key`` (None if it never was or has expired)."""
        row = self.db.execute_sql(
            self.sql_find, (owner, key, self._stamp(naive_utc(now)))
        ).fetchone()
        if row is None:
            return None
        return StoredKey(*row[:7], json.loads(row[7]), row[8])

    def set_refund(self, row_id: int, answer: str) -> None:
        self.db.execute_sql(self.sql_refunded, (answer, row_id))


def replay(stored: StoredKey | None, key: RequestKey, now: datetime) -> Replay:
    """The stored answer for a retry of ``key``: 422 if it came with another request, 409 if
    the row vanished meanwhile (expired and pruned: a retry will be decided afresh)."""
    if stored is None:
        raise KeyInFlight()
    if stored.fingerprint != key.fingerprint:
        raise KeyReused()
    return Replay(stored.status, stored.response, now)


def prune_expired(now: datetime, batch: int) -> int:
    """Delete up to ``batch`` keys whose TTL is over (the retention job calls it)."""
    ids = (
        IdempotencyKey.select(IdempotencyKey.id)
        .where(IdempotencyKey.expires_at <= naive_utc(now))
        .order_by(IdempotencyKey.id)
        .limit(batch)
    )
    return IdempotencyKey.delete().where(IdempotencyKey.id.in_(ids)).execute()
