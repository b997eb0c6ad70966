"""Fixtures on a real PostgreSQL server, registered for every test module by conftest.py:
``pg`` (the server, one per module that uses it), ``pg_url`` (a database on it) and
``pg_app`` (the app on that database, emptied first). Without the server binaries a test
that asks for them is skipped here and fails under CI=true (services.missing)."""

from __future__ import annotations

import pytest
from services import INITDB, Postgres, missing


@pytest.fixture(scope="module")
def pg():
    if INITDB is None:
        missing("PostgreSQL server binaries not installed (apt-get install postgresql)")
    pytest.importorskip("psycopg2", reason="pip install psycopg2-binary (the test extras do)")
    server = Postgres()
    server.start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="module")
def pg_url(pg):
    return pg.create_database()


def _reset() -> None:
    from quotaserver import models

    db = models.database_proxy.obj
    tables = [m._meta.table_name for m in (*models.ALL_MODELS, *models.LOAD_MODELS)]
    db.execute_sql("DROP TABLE IF EXISTS " + ", ".join(f'"{t}"' for t in tables) + " CASCADE")


@pytest.fixture
def pg_app(app_factory, pg_url, io_loop):
    """Start the real app on the PostgreSQL database, emptied first."""

    async def start(**overrides):
        app = await app_factory(database__url=pg_url, **overrides)
        await app.store.run(_reset)
        await app.stop()
        return await app_factory(database__url=pg_url, **overrides)

    return start
