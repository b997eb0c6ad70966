"""The SQLite group committer on a real database file: a failed COMMIT fails its batch."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from clients import consume
from peewee import IntegrityError, SqliteDatabase

from quotaserver.db import GroupCommitter, add_to_commit
from quotaserver.models import User


@pytest.fixture
def committer(tmp_path):
    path = f"{tmp_path}/batch.db"
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE parent (id INTEGER PRIMARY KEY);"
            "CREATE TABLE child (id INTEGER PRIMARY KEY, parent_id INTEGER REFERENCES "
            "parent (id) DEFERRABLE INITIALLY DEFERRED);"
        )
    # A deferred foreign key is checked at COMMIT: the one way SQLite fails a COMMIT after
    # every statement of the transaction has succeeded.
    database = SqliteDatabase(path, pragmas={"foreign_keys": 1}, check_same_thread=False)
    committer = GroupCommitter(database)
    committer.path = path
    yield committer
    committer.shutdown()


def rows(path: str, table: str) -> list[tuple]:
    with sqlite3.connect(path) as db:
        return db.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()


def test_a_failed_commit_fails_every_caller_of_its_batch_and_writes_nothing(committer):
    db = committer.db
    started, release = threading.Event(), threading.Event()

    def hold():  # keeps the writer busy while the next batch queues up
        started.set()
        release.wait(30)
        return "first batch"

    first = committer.submit(hold)
    assert started.wait(30)
    good = committer.submit(lambda: db.execute_sql("INSERT INTO parent (id) VALUES (1)"))
    orphan = committer.submit(lambda: db.execute_sql("INSERT INTO child VALUES (1, 99)"))
    own_error = committer.submit(lambda: 1 / 0)
    release.set()
    assert first.result(30) == "first batch"
    # The good unit and the orphan both ran; the COMMIT of their batch failed: both callers
    # get that error. The unit that raised by itself keeps its own error.
    for future in (good, orphan):
        with pytest.raises(IntegrityError, match="FOREIGN KEY"):
            future.result(30)
    with pytest.raises(ZeroDivisionError):
        own_error.result(30)
    assert rows(committer.path, "parent") == [] and rows(committer.path, "child") == []
    # The writer goes on with the next batch.
    committer.submit(lambda: db.execute_sql("INSERT INTO parent (id) VALUES (2)")).result(30)
    assert rows(committer.path, "parent") == [(2,)]


def test_a_failing_unit_rolls_back_alone(committer):
    db = committer.db
    started, release = threading.Event(), threading.Event()
    committer.submit(lambda: (started.set(), release.wait(30)))
    assert started.wait(30)

    def half_then_fail():
        db.execute_sql("INSERT INTO parent (id) VALUES (10)")
        raise ValueError("after a write")

    kept = committer.submit(lambda: db.execute_sql("INSERT INTO parent (id) VALUES (11)"))
    failed = committer.submit(half_then_fail)
    release.set()
    kept.result(30)
    with pytest.raises(ValueError):
        failed.result(30)
    assert rows(committer.path, "parent") == [(11,)]  # its savepoint undid the 10


def test_totals_of_a_batch_are_written_once_before_its_commit_without_failed_units(committer):
    db = committer.db
    db.execute_sql("CREATE TABLE totals (id INTEGER PRIMARY KEY, n INTEGER, writes INTEGER)")
    writes: list[dict] = []

    def write(totals: dict) -> None:
        writes.append(dict(totals))
        for key, (n,) in totals.items():
            db.execute_sql(
                "INSERT INTO totals VALUES (?, ?, 1) ON CONFLICT (id) DO UPDATE SET "
                "n = n + excluded.n, writes = writes + 1",
                (key, n),
            )

    started, release = threading.Event(), threading.Event()
    committer.submit(lambda: (started.set(), release.wait(30)))
    assert started.wait(30)

    def adds(n: int, fail: bool = False) -> bool:
        assert add_to_commit(write, 1, (n,))
        if fail:
            raise ValueError("after adding")
        return True

    units = [committer.submit(lambda n=n: adds(n)) for n in (1, 2, 3)]
    failed = committer.submit(lambda: adds(100, fail=True))
    release.set()
    assert [u.result(30) for u in units] == [True, True, True]
    with pytest.raises(ValueError):
        failed.result(30)
    # One write for the batch, with the sum of the units that succeeded.
    assert writes == [{1: (6,)}]
    assert rows(committer.path, "totals") == [(1, 6, 1)]
    # Outside a group commit there is nothing to add to: the caller writes itself.
    assert add_to_commit(write, 1, (1,)) is False


@pytest.mark.gen_test(timeout=30)
async def test_two_apps_in_one_process_each_use_their_own_database(app_factory, tmp_path):
    """The models follow the store whose thread runs them: no process-wide database."""
    first = await app_factory(database__url=f"sqlite:///{tmp_path}/first.db")
    second = await app_factory(database__url=f"sqlite:///{tmp_path}/second.db")
    assert (await consume(first, "only-in-first")).code == 200
    assert (await consume(second, "only-in-second")).code == 200
    assert (await consume(first, "only-in-first")).json["periods"]["daily"]["used"] == 2

    def names() -> list[str]:
        return [u.username for u in User.select().order_by(User.username)]

    assert await first.store.run(names) == ["only-in-first"]
    assert await second.store.run(names) == ["only-in-second"]
    assert await first.store.read(names) == ["only-in-first"]  # its reader threads too
    for name in ("first", "second"):
        with sqlite3.connect(f"{tmp_path}/{name}.db") as db:
            rows = db.execute("SELECT username FROM user").fetchall()
        assert rows == [(f"only-in-{name}",)]


@pytest.mark.gen_test(timeout=30)
async def test_a_freshly_migrated_database_is_what_the_models_declare(app_factory):
    """Migrations are written out; a model changed without a migration fails here."""
    from schema_check import disagreements

    app = await app_factory()
    assert await app.store.run(lambda: disagreements(app.store.db)) == []
