"""The real application on a temporary SQLite file, over real sockets."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import hypothesis  # noqa: F401 - imported early, see below
import pytest

# hypothesis's pytest plugin imports the library lazily, at the end of a session, from a
# stack ~250 frames deep; CPython 3.11.7's compiler then fails ("AST constructor recursion
# depth mismatch") when pytest rewrites its modules. Importing it here, shallow, avoids that
# for runs that select no hypothesis test (tests/test_cluster.py alone, say).

# `make mutation` (mutmut): its stats run, which learns which tests execute which function,
# cannot follow a test into a server process the test starts (the child would look for
# mutmut's settings in the test's working directory and fail). Such children run the code
# unmutated; this process keeps its own copy of the setting. A mutant run leaves it as is,
# so a child runs the mutant too.
if os.environ.get("MUTANT_UNDER_TEST") == "stats":
    del os.environ["MUTANT_UNDER_TEST"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import psutil  # noqa: E402
from clients import ADMIN, METRICS, SERVICE, VIEWER  # noqa: E402
from pg_fixtures import pg, pg_app, pg_url  # noqa: E402, F401  (fixtures, one server per module)
from services import CI, missing  # noqa: E402
from waits import wait_until_sync  # noqa: E402

from quotaserver.app import QuotaApp  # noqa: E402
from quotaserver.config import Config, load_config  # noqa: E402
from quotaserver.redaction import install_log_redaction  # noqa: E402

# In-process servers get the log redaction the entry point (quotaserver.cli) installs.
install_log_redaction()


# CI replays a red run: examples derived from the test, the failing one printed as a blob.
hypothesis.settings.register_profile("ci", derandomize=True, print_blob=True)
if CI:
    hypothesis.settings.load_profile("ci")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_binary(present, reason): skip (fail under CI=true) without a binary"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs_binary"):
        if not mark.kwargs["present"]:
            missing(mark.kwargs["reason"])


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


class FakeMonotonic:
    """An injectable monotonic clock (seconds) for limiters that take ``clock=``."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


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
    # The test is over and its loop closes next: end the core threads now instead of after
    # their 2 s idle timeout (the app keeps them for other apps on a shared loop). A thread
    # still running work keeps running and is reported by ``nothing_left_behind``.
    for app in apps:
        app.threads.core.shutdown()


@pytest.fixture(autouse=True)
def nothing_left_behind(request: pytest.FixtureRequest) -> Any:
    """Fail a test that leaves a thread or a child process running after its teardown.

    Module-scoped fixtures (a shared server, Playwright's driver) start before this and are
    not counted. A leftover costs every later run its wait, so it is a defect of the test.
    """
    threads = set(threading.enumerate())
    me = psutil.Process()
    children = {p.pid for p in me.children(recursive=True)}
    yield

    def new_threads() -> list[str]:
        return [t.name for t in threading.enumerate() if t not in threads and t.is_alive()]

    def new_children() -> list[str]:
        found = []
        for child in me.children(recursive=True):
            try:
                if child.pid in children or child.status() == psutil.STATUS_ZOMBIE:
                    continue
                # Helpers a module-scoped process starts on demand (Chromium's) are its own.
                if any(parent.pid in children for parent in child.parents()):
                    continue
                found.append(f"{child.pid} {' '.join(child.cmdline()[:3])}")
            except psutil.NoSuchProcess:
                continue
        return found

    try:
        wait_until_sync(lambda: not new_threads() and not new_children(), "leftovers", 15)
    except AssertionError:
        pytest.fail(
            f"{request.node.nodeid} left behind threads {new_threads()} "
            f"and processes {new_children()}",
            pytrace=False,
        )
