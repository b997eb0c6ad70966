"""The Users tab follows the stream: no polling, no re-query for usage or limit changes
(issue 13, item 4)."""

from __future__ import annotations

from typing import Any

import pytest

from .support import WAIT

pytestmark = pytest.mark.browser


@pytest.mark.parametrize("transport", ["websocket", "sse"])
def test_the_users_tab_shows_new_usage_and_a_limit_change_from_the_stream_alone(
    server, open_dashboard, transport
):
    # Over SSE the usage event (a type the analytics plugin declares) arrives only because
    # the page listens to the plugin types the welcome lists.
    page = open_dashboard(server, block_websocket=transport == "sse")
    expected = "via SSE" if transport == "sse" else "via WebSocket"
    page.wait_for_function(
        "text => document.getElementById('conn-transport').textContent === text",
        arg=expected, timeout=WAIT,
    )  # fmt: skip
    name = f"live-newbie-{transport}"  # the module shares one server
    page.click("#tab-users")
    with page.expect_response(lambda r: f"/users?q={name}" in r.url, timeout=WAIT):
        page.fill("#users-search", name)
    page.wait_for_function(
        "() => document.getElementById('users-summary').textContent === '0 users'"
        " && document.querySelector('#users-body .empty-row') !== null",
        timeout=WAIT,
    )
    requests: list[str] = []

    def count(request: Any) -> None:
        if "/api/admin/quotas/users" in request.url:
            requests.append(request.url)

    page.on("request", count)

    # A user the page has never seen consumes: the row appears from the usage event.
    assert server.consume(name, "shell", 3) == 200
    row = f"#users-body tr[data-username='{name}']"
    cell = f"{row} td[data-type=shell] .usage-text"
    page.wait_for_function(
        "sel => document.querySelector(sel)?.textContent === '3 / 500'", arg=cell, timeout=WAIT
    )
    assert server.consume(name, "shell", 2) == 200
    page.wait_for_function(
        "sel => document.querySelector(sel)?.textContent === '5 / 500'", arg=cell, timeout=WAIT
    )

    # An admin lowers the user's daily limit elsewhere: the quota_change event updates the
    # limit, the utilisation and the risk in place.
    server.set_user_limit(name, 6)
    page.wait_for_function(
        "sel => document.querySelector(sel)?.textContent === '5 / 6'", arg=cell, timeout=WAIT
    )
    assert page.locator(f"{row} td[data-type=shell] .override-mark").count() == 1
    assert page.inner_text(f"{row} .risk") == "elevated"  # 83.3 %

    page.wait_for_timeout(1500)  # time for any poll or refresh that would be made
    assert requests == [], requests
    assert page.errors == []

    # Asked for, the page reloads over REST and shows the same.
    with page.expect_request(lambda r: "/api/admin/quotas/users" in r.url, timeout=WAIT):
        page.click("#reload")
    assert page.evaluate("window.quotaDashboard.reloads") == 1
    page.wait_for_function(
        "sel => document.querySelector(sel)?.textContent === '5 / 6'", arg=cell, timeout=WAIT
    )


def test_an_event_newer_than_a_slow_users_answer_is_applied_to_its_rows(server, open_dashboard):
    """The Users tab asks for a page; a limit change commits after the server read that page
    but before the answer reaches the browser. The event was applied to the rows the answer
    replaces, so the page applies it again to the answer's rows (they predate it)."""
    assert server.consume("slow-sam", "shell", 2) == 200
    page = open_dashboard(server)
    page.click("#tab-users")
    page.wait_for_selector("#users-body tr", timeout=WAIT)
    held: list[tuple[Any, Any]] = []

    def hold(route: Any) -> None:
        held.append((route, route.fetch()))  # the server's answer, read now, delivered later

    page.route("**/api/admin/quotas/users?q=slow-sam*", hold)
    page.fill("#users-search", "slow-sam")
    for _ in range(200):
        if held:
            break
        page.wait_for_timeout(50)
    assert held, "the search was never sent"
    server.set_user_limit("slow-sam", 4)  # after the snapshot, before the answer arrives
    page.wait_for_timeout(500)  # the quota_change event reaches the page first
    route, answer = held[0]
    assert answer.json()["items"][0]["usage"]["shell"]["limit"] == 500  # read before it
    route.fulfill(response=answer)
    cell = "#users-body tr[data-username='slow-sam'] td[data-type=shell] .usage-text"
    page.wait_for_function(
        "sel => document.querySelector(sel)?.textContent === '2 / 4'", arg=cell, timeout=WAIT
    )
    page.unroute("**/api/admin/quotas/users?q=slow-sam*")
    assert page.errors == []
