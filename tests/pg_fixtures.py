"""Fixtures for the app on a real PostgreSQL server: one server per module that imports them."""

from __future__ import annotations

import pytest
from services import Postgres


@pytest.fixture(scope="module")
def pg_url():
    pytest.importorskip("psycopg2", reason="pip install psycopg2-binary (the test extras do)")
    server = Postgres()
    server.start()
    try:
        yield server.create_database()
    finally:
        server.destroy()


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
