"""What a third-party plugin adds reaches the dashboard: its stats field as a figure card
and its declared event types as a live feed (loaded over REST, then from the stream)."""

from __future__ import annotations

from typing import Any

import pytest

from .support import WAIT, Server, write_queue_plugin

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def plugin_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    directory = str(tmp_path_factory.mktemp("plugin-server"))
    # Markup in plugin data must reach the page as text.
    plugins = write_queue_plugin(directory, "f\"<b>{violation['username']}</b> queue backed up\"")
    srv = Server(directory, plugins_dir=plugins)
    srv.start()
    yield srv
    srv.stop()


def violate(server: Server, user: str) -> None:
    server.set_user_limit(user, 1)
    assert server.consume(user, "shell", 2) == 429


def feed_texts(page: Any) -> list[str]:
    return page.eval_on_selector_all(
        "#plugin-events-feed .plugin-event .p-text", "nodes => nodes.map(n => n.textContent)"
    )


@pytest.mark.parametrize("transport", ["websocket", "sse"])
def test_plugin_figures_and_events_reach_the_dashboard(plugin_server, open_dashboard, transport):
    before = f"before-{transport}"
    violate(plugin_server, before)  # a durable plugin event before the page opens
    page = open_dashboard(plugin_server, block_websocket=transport == "sse")
    expected = "via SSE" if transport == "sse" else "via WebSocket"
    page.wait_for_function(
        "text => document.getElementById('conn-transport').textContent === text",
        arg=expected, timeout=WAIT,
    )  # fmt: skip

    # The stats field becomes a card, its values formatted by their names.
    card = "#plugin-figures .plugin-card[data-field=queue]"
    page.wait_for_selector(card, timeout=WAIT)
    assert page.inner_text(f"{card} dd[data-key=depth]") == "7"
    assert page.inner_text(f"{card} dd[data-key=oldest_seconds]") == "3.5"
    assert page.inner_text(f"{card} dd[data-key=spool_bytes]") == "3 MiB"
    # The core figures keep their own cards; the example disk plugin (installed for the
    # tests) is a plugin like any other.
    fields = page.eval_on_selector_all(
        "#plugin-figures .plugin-card", "nodes => nodes.map(n => n.dataset.field)"
    )
    assert "queue" in fields and "total_users" not in fields and "system_load" not in fields

    # The event from before the page opened came with the first REST load.
    assert page.is_visible("#plugin-events")
    assert f"<b>{before}</b> queue backed up" in feed_texts(page)

    # A new one arrives from the stream alone, newest first, as text.
    after = f"after-{transport}"
    violate(plugin_server, after)
    page.wait_for_function(
        "text => document.querySelector('#plugin-events-feed .p-text')?.textContent === text",
        arg=f"<b>{after}</b> queue backed up", timeout=WAIT,
    )  # fmt: skip
    assert page.locator("#plugin-events-feed b").count() == 0
    texts = feed_texts(page)
    assert len(texts) == len(set(texts))  # each event once (REST and stream overlap)
    assert page.inner_text("#plugin-events-count") == str(len(texts))
    assert page.errors == []


def test_without_plugin_event_types_the_feed_stays_hidden(server, open_dashboard):
    # The shared server runs the built-in plugins only (their `usage` type is shown in the
    # Users tab, not in this feed).
    page = open_dashboard(server)
    assert page.is_hidden("#plugin-events")
    assert page.errors == []


def test_with_the_analytics_plugin_off_the_core_figures_stay(tmp_path, open_dashboard):
    """Each plugin's cards come and go with it; the load and the throttle are the core's."""
    srv = Server(str(tmp_path), plugins={"quota_analytics": {"enabled": False}})
    srv.start()
    try:
        page = open_dashboard(srv)
        page.wait_for_function(
            "() => document.getElementById('stat-throttle').textContent !== '—'", timeout=WAIT
        )
        assert page.inner_text("#stat-throttle") == "1.00"
        assert page.is_visible("article[data-field=system_load] #stat-cpu")
        for field in ("total_users", "commands_today", "load_refusals_today"):
            assert page.is_hidden(f"article[data-field={field}]"), field
        # No card for a core field, nor for what the overview shows; the example disk
        # plugin (installed for the tests) still has its own.
        page.wait_for_selector("#plugin-figures .plugin-card[data-field=disk]", timeout=WAIT)
        fields = page.eval_on_selector_all(
            "#plugin-figures .plugin-card", "nodes => nodes.map(n => n.dataset.field)"
        )
        assert fields == ["disk"], fields
        assert page.errors == []
    finally:
        srv.stop()
