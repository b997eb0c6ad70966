"""Browser tests: headless Debian Chromium via Playwright against the real server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from services import missing, needs

from .support import ADMIN, CHROMIUM, CHROMIUM_ARGS, WAIT, Server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.path.exists(CHROMIUM):
        return
    skip = needs(False, reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    for item in items:
        if "browser" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # Module scope: while Playwright's sync API is open, this thread's asyncio loop counts
    # as running, which the pytest-tornado tests of other modules cannot share.
    if not os.path.exists(CHROMIUM):
        missing(f"no Chromium at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server shared by a module's tests (each test uses its own user names)."""
    srv = Server(str(tmp_path_factory.mktemp("server")))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def own_server(tmp_path: Any) -> Iterator[Server]:
    """A server for one test (for tests that stop and restart it)."""
    srv = Server(str(tmp_path))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def open_dashboard(browser: Any) -> Iterator[Any]:
    """``page = open_dashboard(server, token=ADMIN, block_websocket=False, viewport=...,
    context=...)``: a signed-in, live page."""
    contexts = []

    def open_(server: Server, token: str = ADMIN, block_websocket: bool = False, **kw: Any):
        viewport = kw.pop("viewport", {"width": 1280, "height": 800})
        # context={...}: more browser context options (color_scheme, timezone_id, ...).
        context = browser.new_context(
            viewport=viewport, permissions=kw.pop("permissions", []), **kw.pop("context", {})
        )
        contexts.append(context)
        if "init_script" in kw:
            context.add_init_script(kw.pop("init_script"))
        if block_websocket:
            # As if a proxy refused WebSocket: the page's socket closes before any message.
            context.route_web_socket("**/ws/admin/quotas**", lambda ws: ws.close())
        page = context.new_page()
        page.errors = []
        page.on("pageerror", lambda exc: page.errors.append(str(exc)))
        page.goto(f"{server.url}/login")  # issue 12: no token in a URL
        page.fill("#token", token)
        page.click("button[type=submit]")
        page.wait_for_url("**/admin/quotas")
        page.wait_for_selector("#conn[data-state=connected]", timeout=WAIT)
        return page

    yield open_
    for context in contexts:
        context.close()
