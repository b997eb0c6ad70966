"""The dashboard shows an alert's ``action`` text (protocol 2), hidden when there is none."""

from __future__ import annotations

import pytest

from .support import WAIT

pytestmark = pytest.mark.browser


def test_the_alert_card_shows_the_action_text(server, open_dashboard):
    page = open_dashboard(server)
    server.set_user_limit("acting-al", 0)
    for _ in range(5):  # the alert engine's quota_violation rule fires at 5 a day
        assert server.consume("acting-al") == 429
    alert = server.wait_for_open_alert("acting-al")  # raised after the 5th answer
    assert alert["action_needed"] is True and alert["action"]
    card = f"#alerts-feed li[data-alert-id='{alert['alert_id']}']"
    page.wait_for_selector(f"{card} .a-action:visible", timeout=WAIT)
    assert page.locator(f"{card} .a-action-text").inner_text() == alert["action"]
    assert page.errors == []
