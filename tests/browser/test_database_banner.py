"""The dashboard says when the server's database is unavailable, and when it is back."""

from __future__ import annotations

import sqlite3

import pytest

from .support import WAIT, Server

pytestmark = pytest.mark.browser


def test_the_dashboard_shows_database_unavailable_while_sqlite_is_locked(tmp_path, open_dashboard):
    server = Server(str(tmp_path), database__busy_timeout=0.2)
    server.start()
    try:
        page = open_dashboard(server)
        banner = page.locator("#db-banner")
        assert banner.is_hidden()
        holder = sqlite3.connect(server.db_path, isolation_level=None, timeout=0)
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        try:
            banner.wait_for(state="visible", timeout=WAIT)
            assert "Database unavailable" in banner.inner_text()
        finally:
            holder.rollback()
            holder.close()
        banner.wait_for(state="hidden", timeout=WAIT)
        assert page.errors == []
    finally:
        server.stop()
