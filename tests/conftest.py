"""The real application on a temporary SQLite file, over real sockets."""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import hypothesis  # noqa: F401 - imported early, see below
import pytest

# hypothesis's pytest plugin imports the library lazily, at the end of a session, from a
# stack ~250 frames deep; CPython 3.11.7's compiler then fails ("AST constructor recursion
# depth mismatch") when pytest rewrites its modules. Importing it here, shallow, avoids that
# for runs that select no hypothesis test (tests/test_cluster.py alone, say).

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from clients import ADMIN, METRICS, SERVICE, VIEWER  # noqa: E402

from quotaserver.app import QuotaApp  # noqa: E402
from quotaserver.config import Config, load_config  # noqa: E402


def sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


TOKENS = [
    {"name": "test-admin", "role": "admin", "sha256": sha(ADMIN)},
    {"name": "test-viewer", "role": "viewer", "sha256": sha(VIEWER)},
    {"name": "test-service", "role": "service", "sha256": sha(SERVICE)},
    {"name": "test-metrics", "role": "metrics", "sha256": sha(METRICS)},
]


class FakeClock:
    """An injectable clock: tests move time instead of sleeping."""

    def __init__(self, start: datetime | None = None):
        self.now = start or datetime(2026, 3, 10, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)

    def set(self, when: datetime) -> None:
        self.now = when


def make_config(tmp_path: Any, plugins: dict | None = None, **overrides: Any) -> Config:
    """A config on a temp SQLite file, test tokens, port 0; ``a__b=v`` sets ``a.b``."""
    base = load_config(env={})
    values = {
        "database__url": f"sqlite:///{tmp_path}/quotaserver.db",
        "database__sqlite_synchronous": "normal",
        "server__port": 0,
        "auth__tokens": TOKENS,
        "auth__token_file": f"{tmp_path}/admin_token",
        # Tests inject load and expect the factor at once (test_throttle.py tests the hold).
        "throttle__hold_seconds": 0.0,
    }
    values.update(overrides)
    config = base.with_overrides(**values)
    # The system-metrics plugin samples the real machine: tests inject load instead.
    config.plugins = {"system_metrics": {"enabled": False}, **(plugins or {})}
    return config


@pytest.fixture
def app_factory(io_loop: Any, tmp_path: Any) -> Callable[..., Any]:
    """``app = await app_factory(**config_overrides)`` starts a real server."""
    apps: list[QuotaApp] = []

    async def start(
        plugins: dict | None = None,
        clock: Callable[[], datetime] | None = None,
        env: dict | None = None,
        **overrides: Any,
    ) -> QuotaApp:
        config = make_config(tmp_path, plugins, **overrides)
        kwargs: dict[str, Any] = {"env": env or {}}
        if clock is not None:
            kwargs["clock"] = clock
        app = QuotaApp(config, **kwargs)
        await app.start()
        apps.append(app)
        return app

    yield start
    for app in apps:
        io_loop.run_sync(app.stop, timeout=15)  # idempotent: tests may have stopped it
