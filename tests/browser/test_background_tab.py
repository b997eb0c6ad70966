"""A background tab tells you: the tab title counts open, unacknowledged alerts; once the
admin opts in, a critical alert raises a real browser Notification while the tab is hidden.

Playwright keeps every page visible and focused (microsoft/playwright#2286), so the test hides
the page itself: ``document.visibilityState`` reads a flag the test sets, and the
``visibilitychange`` event fires as in a browser. ``Notification`` is Chromium's own, with the
permission granted through Playwright; a subclass only records what was shown.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .support import API, WAIT, Server

pytestmark = pytest.mark.browser

BASE_TITLE = "quotaserver · admin"
RECORD_AND_HIDE = """
(() => {
  const Real = window.Notification;
  window.__notes = [];
  window.__permissionRequests = 0;
  class Recorded extends Real {
    constructor(title, options) {
      super(title, options);
      const entry = { title, body: options && options.body, shown: false };
      window.__notes.push(entry);
      this.addEventListener("show", () => { entry.shown = true; });
    }
  }
  Recorded.requestPermission = (...args) => {
    window.__permissionRequests += 1;
    return Real.requestPermission(...args);
  };
  window.Notification = Recorded;
  let hidden = false;
  const state = () => (hidden ? "hidden" : "visible");
  Object.defineProperty(document, "visibilityState", { get: state });
  Object.defineProperty(document, "hidden", { get: () => hidden });
  window.__setHidden = (value) => {
    hidden = value;
    document.dispatchEvent(new Event("visibilitychange"));
  };
})();
"""


@pytest.fixture(scope="module")
def quiet_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The shared machine's real load must not raise alerts of its own in this test."""
    off = {"enabled": False}
    srv = Server(
        str(tmp_path_factory.mktemp("background")),
        plugins={
            "system_metrics": {"interval": 1.0},
            "alert_engine": {"rules": {"high_system_load": off, "sustained_throttling": off}},
        },
    )
    srv.start()
    yield srv
    srv.stop()


def critical_alert(server, user: str) -> dict:
    """The alert engine's quota_violation rule: critical at the 5th violation of the day."""
    server.set_user_limit(user, 0)
    for _ in range(5):
        assert server.consume(user) == 429
    return server.wait_for_open_alert(user)


def wait_for_title(page, count: int) -> None:
    expected = f"({count}) {BASE_TITLE}" if count else BASE_TITLE
    page.wait_for_function("(t) => document.title === t", arg=expected, timeout=WAIT)


def test_title_counts_open_alerts_and_a_hidden_tab_notifies_after_opt_in(
    quiet_server, open_dashboard
):
    server = quiet_server
    page = open_dashboard(server, permissions=["notifications"], init_script=RECORD_AND_HIDE)
    wait_for_title(page, 0)
    button = page.locator("#notify-toggle")
    assert button.inner_text() == "Notify me"
    assert page.evaluate("window.__permissionRequests") == 0  # never a prompt on load

    first = critical_alert(server, "tab-ana")
    wait_for_title(page, 1)
    status, _ = server.call("POST", f"{API}/alerts/{first['alert_id']}/acknowledge")
    assert status == 200
    wait_for_title(page, 0)  # acknowledged: no longer counted

    page.evaluate("window.__setHidden(true)")
    critical_alert(server, "tab-ben")  # hidden, but not opted in: no notification
    wait_for_title(page, 1)
    assert page.evaluate("window.__notes") == []

    button.click()
    page.wait_for_function(
        "document.getElementById('notify-toggle').textContent === 'Notifying'", timeout=WAIT
    )
    # A high alert (80 % of a daily limit) is counted but does not notify; a critical one does.
    server.set_user_limit("tab-cy", 10)
    assert server.consume("tab-cy", count=8) == 200
    server.wait_for_open_alert("tab-cy")
    critical_alert(server, "tab-dee")
    wait_for_title(page, 3)  # ben, cy and dee
    page.wait_for_function("window.__notes.length >= 1 && window.__notes[0].shown", timeout=WAIT)
    notes = page.evaluate("window.__notes")
    assert [(n["title"], n["body"]) for n in notes] == [
        ("Critical alert: quota_violation", "tab-dee: Critical: 5 quota violations today")
    ]

    page.evaluate("window.__setHidden(false)")  # in front again: the title is enough
    critical_alert(server, "tab-eli")
    wait_for_title(page, 4)
    assert len(page.evaluate("window.__notes")) == 1
    assert page.errors == []
