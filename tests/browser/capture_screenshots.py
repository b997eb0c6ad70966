"""Capture the dashboard screenshots kept in docs/screenshots/ (run by hand, not a test).

    .venv/bin/python tests/browser/capture_screenshots.py [--warmup SECONDS]

Starts the real server with demo traffic on a fresh database, lets it run so the charts
have data, then photographs the main views at 1280x800 and at phone width (390x844); then
a second server with a small third-party plugin (a stats field and an event type) for the
plugin figures and the plugin events feed; then a third whose throttle starts refusing every
consume after a minute, for the load refusals.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/

from support import (  # noqa: E402
    ADMIN,
    API,
    CHROMIUM,
    CHROMIUM_ARGS,
    ROOT,
    WAIT,
    Server,
    write_queue_plugin,
)

OUT = os.path.join(ROOT, "docs", "screenshots")
# Playwright emulates a light system theme unless told otherwise: the screenshots show the
# dark theme (color_scheme="dark"), except dashboard-light.png.
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=float, default=150.0, help="seconds of demo traffic")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    os.makedirs(OUT, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(tmp, demo=True, database__busy_timeout=0.2)
        server.start()
        try:
            print(f"demo traffic for {args.warmup:.0f} s ...", flush=True)
            time.sleep(args.warmup)
            open_alerts = server.call("GET", f"{API}/alerts?status=open")[1]["items"]
            if len(open_alerts) > 1:  # show both states in the feed
                server.call("POST", f"{API}/alerts/{open_alerts[-1]['alert_id']}/acknowledge")
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                shoot(browser, server, DESKTOP, "desktop")
                shoot(browser, server, PHONE, "phone")
                light(browser, server)
                browser.close()
        finally:
            server.stop()
        plugin_view(tmp)
        load_view(tmp, args.warmup)
    print(f"screenshots in {OUT}")
    return 0


def shoot(browser, server: Server, viewport: dict, label: str) -> None:
    context = browser.new_context(viewport=viewport, device_scale_factor=1, color_scheme="dark")
    page = context.new_page()
    page.goto(f"{server.url}/login")  # issue 12: no token in a URL
    page.fill("#token", ADMIN)
    page.click("button[type=submit]")
    page.wait_for_selector("#conn[data-state=connected]", timeout=WAIT)
    page.wait_for_selector("#violations-feed li", timeout=WAIT)
    time.sleep(3)  # a few live updates and the chart history
    save(page, "dashboard" if label == "desktop" else f"live-{label}")  # README shows it
    page.click("#tab-users")
    page.wait_for_selector("#users-body tr[data-username]", timeout=WAIT)
    time.sleep(1)
    save(page, f"users-{label}")
    user_view(page, label)
    if label == "desktop":
        page.click("#users-body tr[data-username] button:has-text('Edit limits')")
        page.wait_for_selector("#limits-dialog[open]", timeout=WAIT)
        save(page, "edit-limits-desktop")
        page.click("#limits-cancel")
        page.click("#tab-rules")
        page.wait_for_selector("#overrides-body tr", timeout=WAIT)
        save(page, "rules-desktop")
        kept_edit(page, server)
        page.click("#tab-audit")
        page.wait_for_selector("#audit-body tr", timeout=WAIT)
        save(page, "audit-desktop")
        page.click("#tab-live")
        database_unavailable(page, server)
        stale(page)
    context.close()


def light(browser, server: Server) -> None:
    """The live view in the light theme (prefers-color-scheme: light)."""
    context = browser.new_context(viewport=DESKTOP, device_scale_factor=1, color_scheme="light")
    page = context.new_page()
    page.goto(f"{server.url}/login")
    page.fill("#token", ADMIN)
    page.click("button[type=submit]")
    page.wait_for_selector("#conn[data-state=connected]", timeout=WAIT)
    page.wait_for_selector("#violations-feed li", timeout=WAIT)
    time.sleep(3)
    save(page, "dashboard-light")
    context.close()


def user_view(page, label: str) -> None:
    """The page of the first user in the list, opened from its link."""
    page.click("#users-body tr[data-username] a.username")
    page.wait_for_selector("#user-limits-body tr", timeout=WAIT)
    page.wait_for_selector("#user-audit tr", timeout=WAIT)
    time.sleep(1)
    save(page, f"user-page-{label}", full_page=label == "desktop")
    page.go_back()
    page.wait_for_selector("#conn[data-state=connected]", timeout=WAIT)
    page.click("#tab-users")
    page.wait_for_selector("#users-body tr[data-username]", timeout=WAIT)


def kept_edit(page, server: Server) -> None:
    """An edit kept through another admin's change, then a large jump asking first."""
    row = page.locator("#rules-body tr[data-command=code]")
    row.locator("input[data-period=weekly]").click()
    page.keyboard.type("1800")
    status, rules = server.call("GET", f"{API}/rules")
    daily = rules["defaults"]["code"]["daily"] or 300
    server.call("PUT", f"{API}/rules/code", {"limits": {"daily": daily + 50}})
    row.locator(".row-notice").wait_for(timeout=WAIT)
    save(page, "edit-kept-desktop")
    row.locator("input[data-period=monthly]").click()
    page.keyboard.type("900000")
    row.locator("button", has_text="Save").click()
    page.wait_for_selector("#confirm-dialog[open]", timeout=WAIT)
    save(page, "confirm-jump-desktop")
    page.click("#confirm-no")
    row.locator(".row-notice button").click()


def stale(page) -> None:
    """Offline: the figures dim and say how old they are."""
    page.context.set_offline(True)
    page.evaluate("() => window.quotaDashboard.stream.reconnectNow()")
    page.wait_for_selector("body.stale", timeout=WAIT)
    time.sleep(1)
    save(page, "stale-desktop")
    page.context.set_offline(False)
    page.wait_for_selector("#conn[data-state=connected]", timeout=WAIT)


def load_view(tmp: str, warmup: float) -> None:
    """Demo traffic, then a throttle that refuses every consume: the card and the chart."""
    from playwright.sync_api import sync_playwright

    directory = os.path.join(tmp, "overloaded")
    os.makedirs(directory, exist_ok=True)
    # Every reading is in the factor-0 band; the factor moves only after 60 s (hold).
    throttle = {"cpu_bands": [[0, 0.0]], "memory_bands": [[100, 1.0]], "source": "process",
                "hold_seconds": 60.0}  # fmt: skip
    server = Server(directory, demo=True, throttle=throttle)
    server.start()
    try:
        time.sleep(max(90.0, min(warmup, 150.0)))
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(
                viewport=DESKTOP, device_scale_factor=1, color_scheme="dark"
            )
            page = context.new_page()
            page.goto(f"{server.url}/login")
            page.fill("#token", ADMIN)
            page.click("button[type=submit]")
            page.wait_for_selector("#conn[data-state=connected]", timeout=WAIT)
            time.sleep(3)
            save(page, "load-refusals-desktop")
            browser.close()
    finally:
        server.stop()


def plugin_view(tmp: str) -> None:
    """The Live tab of a server with a third-party plugin: its card and its events."""
    from playwright.sync_api import sync_playwright

    directory = os.path.join(tmp, "with-plugin")
    message = "f\"job queue for {violation['username']} above 5 (7 waiting)\""
    server = Server(directory, demo=True, plugins_dir=write_queue_plugin(directory, message))
    server.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(
                viewport=DESKTOP, device_scale_factor=1, color_scheme="dark"
            )
            page = context.new_page()
            page.goto(f"{server.url}/login")
            page.fill("#token", ADMIN)
            page.click("button[type=submit]")
            page.wait_for_selector("#plugin-events-feed li", timeout=60_000)
            time.sleep(3)
            save(page, "plugins-desktop", full_page=True)  # the cards and the feed
            browser.close()
    finally:
        server.stop()


def database_unavailable(page, server: Server) -> None:
    """Another process holds SQLite's write lock: the banner the dashboard shows, then gone."""
    holder = sqlite3.connect(server.db_path, isolation_level=None, timeout=0)
    holder.execute("BEGIN IMMEDIATE")
    try:
        page.wait_for_selector("#db-banner", state="visible", timeout=WAIT)
        save(page, "database-unavailable-desktop")
    finally:
        holder.rollback()
        holder.close()
    page.wait_for_selector("#db-banner", state="hidden", timeout=WAIT)


def save(page, name: str, full_page: bool = False) -> None:
    path = os.path.join(OUT, f"{name}.png")
    page.screenshot(path=path, full_page=full_page)
    print("  ", os.path.relpath(path, ROOT))


if __name__ == "__main__":
    sys.exit(main())
