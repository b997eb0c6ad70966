"""The dashboard as an admin's daily tool (issue 25): edits survive live changes, large jumps
ask first, load refusals are visible, a page per user, stale data looks stale."""

from __future__ import annotations

import gzip
import os
import pathlib
import urllib.request
from typing import Any

import pytest

from .support import ADMIN, API, ROOT, WAIT, Server

pytestmark = pytest.mark.browser


def rules_row(page: Any, command: str) -> Any:
    page.click("#tab-rules")
    row = page.locator(f"#rules-body tr[data-command='{command}']")
    row.wait_for(timeout=WAIT)
    return row


def global_limit(server: Server, command: str, period: str) -> Any:
    status, rules = server.call("GET", f"{API}/rules")
    assert status == 200, rules
    return rules["defaults"][command][period]


def test_an_edit_survives_another_admins_live_change(server, open_dashboard):
    page = open_dashboard(server)
    row = rules_row(page, "code")
    weekly = row.locator("input[data-period=weekly]")
    assert weekly.input_value() == "1500"
    # Clicking into a filled field selects it: typing replaces "1500", it never appends.
    weekly.click()
    page.keyboard.type("1234")
    assert weekly.input_value() == "1234"

    # Another admin changes the same row's daily limit: the page hears it live.
    status, body = server.call("PUT", f"{API}/rules/code", {"limits": {"daily": 77}})
    assert status == 200, body
    notice = row.locator(".row-notice")
    notice.wait_for(timeout=WAIT)
    assert "Changed by browser-admin" in notice.inner_text()
    assert "daily 77" in notice.inner_text()
    assert weekly.input_value() == "1234"  # what was typed is still there...
    assert page.evaluate("() => document.activeElement.dataset.period") == "weekly"  # ...in focus
    assert row.locator("input[data-period=daily]").input_value() == "300"  # not overwritten

    # Reload drops the edit on purpose and shows the server's values.
    notice.locator("button").click()
    page.wait_for_function(
        "() => document.querySelector(\"#rules-body tr[data-command='code'] "
        "input[data-period=daily]\").value === '77'",
        timeout=WAIT,
    )
    assert row.locator("input[data-period=weekly]").input_value() == "1500"
    assert page.errors == []


def test_a_large_jump_asks_first_and_the_audit_shows_before_and_after(server, open_dashboard):
    page = open_dashboard(server)
    row = rules_row(page, "shell")
    daily = row.locator("input[data-period=daily]")
    daily.click()
    page.keyboard.type("500500")  # what "500" + a click at the end would have become
    row.locator("button", has_text="Save").click()
    dialog = page.locator("#confirm-dialog")
    dialog.wait_for(state="visible", timeout=WAIT)
    assert "shell daily: 500 → 500,500" in dialog.inner_text()
    page.click("#confirm-no")
    dialog.wait_for(state="hidden", timeout=WAIT)
    assert global_limit(server, "shell", "daily") == 500  # nothing was sent

    row.locator("button", has_text="Save").click()
    dialog.wait_for(state="visible", timeout=WAIT)
    with page.expect_response(lambda r: r.url.endswith("/rules/shell"), timeout=WAIT):
        page.click("#confirm-yes")
    assert global_limit(server, "shell", "daily") == 500500
    status, audit = server.call("GET", f"{API}/audit?action=limits.update&per_page=1")
    assert status == 200, audit
    details = audit["items"][0]["details"]
    assert (details["before"]["daily"], details["after"]["daily"]) == (500, 500500)

    # A change within 10x is saved without a question.
    daily.click()
    page.keyboard.type("600000")
    with page.expect_response(lambda r: r.url.endswith("/rules/shell"), timeout=WAIT):
        row.locator("button", has_text="Save").click()
    assert dialog.is_hidden()
    assert global_limit(server, "shell", "daily") == 600000
    assert page.errors == []


def test_the_limits_dialog_asks_before_a_large_jump(server, open_dashboard):
    server.set_user_limit("jumpy-jo", 40)
    page = open_dashboard(server)
    page.click("#tab-users")
    page.fill("#users-search", "jumpy-jo")
    row = page.locator("#users-body tr[data-username='jumpy-jo']")
    row.wait_for(timeout=WAIT)
    row.locator("button", has_text="Edit limits").click()
    field = page.locator("#limits-body input[name='shell.daily']")
    field.wait_for(timeout=WAIT)
    field.click()
    page.keyboard.type("3")  # 40 -> 3: below a tenth
    page.click("#limits-save")
    page.locator("#confirm-dialog").wait_for(state="visible", timeout=WAIT)
    assert "shell daily: 40 → 3" in page.inner_text("#confirm-list")
    with page.expect_response(lambda r: "/users/jumpy-jo/limits/shell" in r.url, timeout=WAIT):
        page.click("#confirm-yes")
    status, detail = server.call("GET", f"{API}/users/jumpy-jo")
    assert detail["limits"]["shell"]["daily"]["limit"] == 3
    assert page.errors == []


def test_load_refusals_show_on_the_card_the_chart_and_the_users_tab(browser, tmp_path):
    # Every CPU reading is in the band with factor 0: the throttle refuses every consume.
    server = Server(
        str(tmp_path),
        throttle={"cpu_bands": [[0, 0.0]], "memory_bands": [[100, 1.0]], "source": "process"},
    )
    server.start()
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{server.url}/login")
        page.fill("#token", ADMIN)
        page.click("button[type=submit]")
        page.wait_for_url("**/admin/quotas")
        page.wait_for_function(
            "() => document.getElementById('stat-throttle-sub').textContent.includes('refusing')",
            timeout=WAIT,
        )
        assert "503" in page.inner_text("#stat-throttle-why")
        # A user known before the throttle is counted per user too.
        server.call("PUT", f"{API}/users/loaded-lu/limits/shell", {"limits": {"daily": 9}})
        for _ in range(3):
            assert server.consume("loaded-lu") == 503
        page.wait_for_function(
            "() => document.getElementById('stat-load_refusals_today').textContent === '3'",
            timeout=WAIT,
        )
        # The commands chart draws a third series, refused for load, with the count.
        page.wait_for_function(
            "() => window.quotaDashboard.charts.refusedInView() === 3", timeout=WAIT
        )
        # Pointing at the newest bucket with refusals shows its values (the three may
        # straddle a minute), "so far" while that bucket is still counting.
        x, refused, current = page.evaluate(
            "() => { const c = window.quotaDashboard.charts.commands;"
            " const p = c.points.filter(q => q.refused > 0).at(-1);"
            " return [c.clientXOf(p.t), p.refused, p.t + 60 > c.o.now()]; }"
        )
        box = page.locator("#chart-commands").bounding_box()
        page.mouse.move(x, box["y"] + box["height"] / 2)
        tip = page.locator("#chart-commands + .chart-tip")
        tip.wait_for(state="visible", timeout=WAIT)
        assert f"refused for load: {refused}" in tip.inner_text()
        assert ("(so far)" in tip.inner_text()) is current
        assert "admitted commands: 0" in tip.inner_text()
        # Another range comes from the history API, the refusals in it.
        with page.expect_response(lambda r: "bucket=600" in r.url, timeout=WAIT):
            page.select_option("#chart-range", "24h")
        page.wait_for_function(
            "() => window.quotaDashboard.charts.refusedInView() === 3", timeout=WAIT
        )
        assert "per 10 min" in page.inner_text("#panel-live figcaption >> nth=0")
        page.click("#tab-users")
        cell = page.locator("#users-body tr[data-username='loaded-lu'] td.refused")
        cell.wait_for(timeout=WAIT)
        assert cell.inner_text() == "3"
        assert errors == []
    finally:
        context.close()
        server.stop()


def test_the_user_page_loads_from_a_link_and_from_its_url_and_updates_live(server, open_dashboard):
    name = "page pat/1"  # a space and a slash: the link must encode them
    server.set_user_limit(name, 2)
    assert [server.consume(name) for _ in range(3)] == [200, 200, 429]
    page = open_dashboard(server)
    page.click("#tab-users")
    page.fill("#users-search", name)
    link = page.locator("#users-body a.username", has_text=name)
    link.wait_for(timeout=WAIT)
    link.click()
    page.wait_for_url("**/admin/quotas/users/page%20pat%2F1", timeout=WAIT)
    view = page.locator("#panel-user")
    view.wait_for(timeout=WAIT)
    assert page.inner_text("#user-name") == name
    shell = page.locator("#user-limits-body tr[data-command=shell] td[data-period=daily]")
    shell.wait_for(timeout=WAIT)
    assert "2 / 2 (100%)" in shell.inner_text()
    assert shell.locator(".override-mark").count() == 1
    page.wait_for_function(
        "() => document.getElementById('user-violations-total').textContent === '1'",
        timeout=WAIT,
    )
    page.wait_for_function(
        "() => /daily [0-9,]+ → 2\\b/.test(document.getElementById('user-audit').textContent)",
        timeout=WAIT,
    )
    assert page.locator("nav.tabs").is_hidden()

    # Live: another violation, and another admin raising the limit.
    assert server.consume(name) == 429
    page.wait_for_function(
        "() => document.getElementById('user-violations').children.length === 2"
        " && document.getElementById('user-violations-total').textContent === '2'",
        timeout=WAIT,
    )
    server.set_user_limit(name, 10)
    page.wait_for_function(
        "() => document.querySelector('#user-limits-body tr[data-command=shell]"
        " td[data-period=daily]').textContent.includes('2 / 10 (20%)')",
        timeout=WAIT,
    )
    page.wait_for_function(
        "() => document.getElementById('user-audit').textContent.includes('daily 2 → 10')",
        timeout=WAIT,
    )

    # Straight from its URL (a bookmark, a reload), and a name nobody has.
    page.goto(f"{server.url}/admin/quotas/users/page%20pat%2F1")
    page.locator("#user-limits-body tr[data-command=shell]").wait_for(timeout=WAIT)
    page.goto(f"{server.url}/admin/quotas/users/nobody-at-all")
    page.locator("#user-missing").wait_for(timeout=WAIT)
    assert page.locator("#user-body").is_hidden()
    assert page.errors == []


def test_stale_figures_dim_and_a_given_up_page_retries_when_the_network_returns(
    own_server, open_dashboard
):
    page = open_dashboard(own_server)
    assert page.evaluate("() => document.body.classList.contains('stale')") is False
    assert "btn-ghost" in page.get_attribute("#reconnect", "class")  # quiet while connected
    # Spend the page's attempts up front, so that losing the server makes it give up at
    # the first failed reconnect instead of after ten back-offs (about 200 s).
    page.evaluate("() => { window.quotaDashboard.stream.attempt = 10; }")
    page.context.set_offline(True)
    own_server.stop()
    page.wait_for_selector("#conn[data-state=disconnected]", timeout=WAIT)
    assert "gave up" in page.inner_text("#conn-text")
    assert page.evaluate("() => document.body.classList.contains('stale')") is True
    assert page.inner_text("#as-of").startswith("as of ")
    opacity = page.evaluate("() => getComputedStyle(document.querySelector('.cards')).opacity")
    assert float(opacity) < 1
    assert "btn-attention" in page.get_attribute("#reconnect", "class")

    own_server.start()
    assert page.get_attribute("#conn", "data-state") == "disconnected"  # gave up: waits
    page.context.set_offline(False)  # the browser fires "online"
    page.wait_for_selector("#conn[data-state=connected]", timeout=WAIT)
    assert page.evaluate("() => window.quotaDashboard.stream.wakeCause") == "network back"
    assert page.evaluate("() => document.body.classList.contains('stale')") is False
    assert page.locator("#as-of").is_hidden()


def test_the_violation_feed_filters_by_user_and_type_from_the_api_and_live(server, open_dashboard):
    for name in ("filter-fin", "filter-flo"):
        server.call("PUT", f"{API}/users/{name}/limits/shell", {"limits": {"daily": 0}})
        server.call("PUT", f"{API}/users/{name}/limits/code", {"limits": {"daily": 0}})
    for _ in range(3):
        assert server.consume("filter-fin", "shell") == 429
    assert server.consume("filter-fin", "code") == 429
    assert server.consume("filter-flo", "shell") == 429
    page = open_dashboard(server)
    page.locator("#violations-type option[value=shell]").wait_for(state="attached", timeout=WAIT)
    users = "() => [...document.querySelectorAll('#violations-feed li')].map(li => [li.querySelector('.v-user').textContent, li.querySelector('.v-type').textContent])"  # noqa: E501

    with page.expect_response(lambda r: "/violations?user=filter-fin" in r.url, timeout=WAIT):
        page.fill("#violations-user", "filter-fin")
    page.wait_for_function(f"() => ({users})().length === 4", timeout=WAIT)
    assert {u for u, _ in page.evaluate(users)} == {"filter-fin"}
    with page.expect_response(lambda r: "command_type=code" in r.url, timeout=WAIT):
        page.select_option("#violations-type", "code")
    page.wait_for_function(f"() => ({users})().length === 1", timeout=WAIT)
    assert page.evaluate(users) == [["filter-fin", "code"]]
    assert page.inner_text("#violations-count") == "1"

    # Live: a matching violation shows, the others do not.
    assert server.consume("filter-flo", "code") == 429
    assert server.consume("filter-fin", "shell") == 429
    assert server.consume("filter-fin", "code") == 429
    page.wait_for_function(f"() => ({users})().length === 2", timeout=WAIT)
    assert page.evaluate(users) == [["filter-fin", "code"]] * 2
    assert page.inner_text("#violations-count") == "2"

    # Clear: the whole live feed again, the ones that arrived while filtered included.
    page.click("#violations-clear")
    page.wait_for_function(
        f"() => ({users})().some(([u, t]) => u === 'filter-flo' && t === 'code')", timeout=WAIT
    )
    assert page.errors == []


def test_the_users_tab_shows_the_servers_percent_live_and_after_a_reload(server, open_dashboard):
    # 5 of 16 is 31.25 %: the server rounds it (half to even) to 31.2, and so must the page.
    server.set_user_limit("round-rae", 16)
    page = open_dashboard(server)
    page.click("#tab-users")
    page.fill("#users-search", "round-rae")
    row = page.locator("#users-body tr[data-username='round-rae']")
    row.wait_for(timeout=WAIT)
    for _ in range(5):
        assert server.consume("round-rae") == 200
    pct = row.locator(".pct")
    page.wait_for_function(
        "() => document.querySelector(\"#users-body tr[data-username='round-rae'] .pct\")"
        "?.textContent === '31.2%'",
        timeout=WAIT,
    )
    # A limit change computed in the page (its event has no percent): 5 of 32 is 15.625.
    server.set_user_limit("round-rae", 32)
    page.wait_for_function(
        "() => document.querySelector(\"#users-body tr[data-username='round-rae'] .pct\")"
        "?.textContent === '15.6%'",
        timeout=WAIT,
    )
    server.set_user_limit("round-rae", 16)
    page.wait_for_function(
        "() => document.querySelector(\"#users-body tr[data-username='round-rae'] .pct\")"
        "?.textContent === '31.2%'",
        timeout=WAIT,
    )
    status, users = server.call("GET", f"{API}/users?q=round-rae")
    assert users["items"][0]["max_percent"] == 31.2
    with page.expect_response(lambda r: "/users?q=round-rae" in r.url, timeout=WAIT):
        page.click("#reload")
    assert pct.inner_text() == "31.2%"
    # The rule in the page agrees with the server's on every tie and near-tie up to 64.
    mismatches = page.evaluate(
        """async () => {
          const { utilization } = await import('/static/js/admin/users.js');
          const out = [];
          for (let limit = 1; limit <= 64; limit++) for (let used = 0; used <= limit; used++)
            out.push([used, limit, utilization(used, limit)]);
          return out;
        }"""
    )
    wrong = [(u, n, v) for u, n, v in mismatches if v != round(100.0 * u / n, 1)]
    assert wrong == []
    assert page.errors == []


def test_the_users_tab_sorts_by_violations_today_from_its_header(server, open_dashboard):
    for name, n in (("sorty-dave", 3), ("sorty-mallory", 5), ("sorty-carol", 1)):
        server.set_user_limit(name, 0)
        for _ in range(n):
            assert server.consume(name) == 429
    page = open_dashboard(server)
    page.click("#tab-users")
    with page.expect_response(lambda r: "/users?q=sorty-" in r.url, timeout=WAIT):
        page.fill("#users-search", "sorty-")
    page.locator("#users-body tr[data-username='sorty-carol']").wait_for(timeout=WAIT)
    names = "() => [...document.querySelectorAll('#users-body tr[data-username]')].map(r => r.dataset.username)"  # noqa: E501
    assert page.evaluate(names) == ["sorty-carol", "sorty-dave", "sorty-mallory"]  # by name
    with page.expect_response(lambda r: "sort=violations" in r.url, timeout=WAIT):
        page.click("#users-head button:has-text('Violations today')")
    page.wait_for_function(f"() => ({names})()[0] === 'sorty-mallory'", timeout=WAIT)
    assert page.evaluate(names) == ["sorty-mallory", "sorty-dave", "sorty-carol"]
    header = page.locator("#users-head th", has_text="Violations today")
    assert header.get_attribute("aria-sort") == "descending"
    assert page.input_value("#users-sort") == "violations"

    # Live: two more for carol move her up (the server sorts again).
    for _ in range(3):
        assert server.consume("sorty-carol") == 429
    page.wait_for_function(f"() => ({names})()[1] === 'sorty-carol'", timeout=WAIT)
    assert page.errors == []


def test_the_csv_links_download_the_same_rows_as_the_api(server, open_dashboard):
    server.set_user_limit("csv-cy", 0)
    assert server.consume("csv-cy") == 429
    page = open_dashboard(server)
    with page.expect_response(lambda r: "/violations?user=csv-cy" in r.url, timeout=WAIT):
        page.fill("#violations-user", "csv-cy")
    with page.expect_download(timeout=WAIT) as download:
        page.click("#violations-csv")
    text = pathlib.Path(download.value.path()).read_text(encoding="utf-8").splitlines()
    status, api = server.call("GET", f"{API}/violations?user=csv-cy")
    assert len(text) == 1 + api["total"] == 2
    assert text[1].startswith(f"{api['items'][0]['id']},") and ",csv-cy,shell," in text[1]
    page.click("#tab-users")
    with page.expect_response(lambda r: "/users?q=csv-" in r.url, timeout=WAIT):
        page.fill("#users-search", "csv-")
    with page.expect_download(timeout=WAIT) as download:
        page.click("#users-csv")
    rows = pathlib.Path(download.value.path()).read_text(encoding="utf-8").splitlines()
    assert [r.split(",")[0] for r in rows] == ["username", "csv-cy"]


def test_static_answers_are_gzip_with_versioned_urls_and_a_long_cache(server, open_dashboard):
    fetched: list[Any] = []
    page_errors: list[str] = []

    def seen(response: Any) -> None:
        if "/static/" in response.url:
            fetched.append(response)

    page = open_dashboard(server)
    page.on("console", lambda m: page_errors.append(m.text) if m.type == "error" else None)
    page.on("response", seen)
    page.reload()
    page.wait_for_selector("#conn[data-state=connected]", timeout=WAIT)
    scripts = [r for r in fetched if r.url.split("?")[0].endswith(".js")]
    names = {r.url.split("?")[0].rsplit("/", 1)[1] for r in scripts}
    assert {"admin_quotas.js", "api.js", "users.js", "user_page.js", "edits.js"} <= names
    for response in fetched:
        assert "?v=" in response.url, response.url  # versioned: the import map did it
        headers = response.all_headers()
        assert "max-age=315360000" in headers.get("cache-control", ""), response.url
        if int(headers.get("content-length", "2000")) >= 1024 or "content-encoding" in headers:
            assert headers.get("content-encoding") == "gzip", response.url
    assert page.errors == [] and page_errors == []

    # Over plain HTTP: gzip only when asked for, never on a byte range.
    url = next(r.url for r in scripts if "/users.js" in r.url)
    path = url.split(server.url, 1)[1]
    with open(os.path.join(ROOT, "static", "js", "admin", "users.js"), "rb") as fh:
        original = fh.read()
    for headers, encoded in (
        ({"Accept-Encoding": "gzip"}, True),
        ({}, False),
        ({"Accept-Encoding": "gzip", "Range": "bytes=0-99"}, False),
    ):
        request = urllib.request.Request(server.url + path, headers=headers)
        with urllib.request.urlopen(request, timeout=30) as resp:
            body = resp.read()
            assert (resp.headers.get("Content-Encoding") == "gzip") is encoded, headers
            assert "Accept-Encoding" in resp.headers.get("Vary", "") or not encoded
        if encoded:
            assert gzip.decompress(body) == original and len(body) < len(original) / 2
        elif "Range" in headers:
            assert body == original[:100]
        else:
            assert body == original


def test_the_url_keeps_tab_search_sort_and_filters_with_back_and_forward(server, open_dashboard):
    server.set_user_limit("urly-ul", 0)
    assert server.consume("urly-ul") == 429
    page = open_dashboard(server)
    page.click("#tab-users")
    with page.expect_response(lambda r: "/users?q=urly" in r.url, timeout=WAIT):
        page.fill("#users-search", "urly")
    page.select_option("#users-sort", "violations")
    page.wait_for_function("() => location.search.includes('sort=violations')", timeout=WAIT)
    assert "tab=users" in page.url and "q=urly" in page.url
    page.click("#tab-rules")
    assert "tab=rules" in page.url

    page.go_back()
    page.wait_for_function(
        "() => document.getElementById('tab-users').getAttribute('aria-selected') === 'true'",
        timeout=WAIT,
    )
    assert page.locator("#panel-users").is_visible()
    page.go_forward()
    page.wait_for_function(
        "() => document.getElementById('tab-rules').getAttribute('aria-selected') === 'true'",
        timeout=WAIT,
    )

    # A reload (or a shared link) opens the same view, the feed filter included.
    page.goto(
        f"{server.url}/admin/quotas?tab=users&q=urly&sort=violations&vuser=urly-ul&vtype=shell"
    )
    page.locator("#users-body tr[data-username='urly-ul']").wait_for(timeout=WAIT)
    assert page.input_value("#users-search") == "urly"
    assert page.input_value("#users-sort") == "violations"
    assert page.input_value("#violations-user") == "urly-ul"
    assert page.input_value("#violations-type") == "shell"
    page.click("#tab-live")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#violations-feed .v-user')].every("
        "n => n.textContent === 'urly-ul')"
        " && document.querySelectorAll('#violations-feed li').length === 1",
        timeout=WAIT,
    )
    assert page.errors == []


def test_an_override_is_added_from_the_rules_tab(server, open_dashboard):
    server.set_user_limit("ovr-olga", 40)
    page = open_dashboard(server)
    rules_row(page, "shell")
    page.fill("#override-user", "ovr-olga")
    page.select_option("#override-type", "shell")
    page.select_option("#override-period", "weekly")
    page.fill("#override-limit", "30")
    with page.expect_response(lambda r: "/users/ovr-olga/limits/shell" in r.url, timeout=WAIT):
        page.click("#override-add")  # weekly 3000 -> 30 would be a jump: asked first
        page.locator("#confirm-dialog").wait_for(state="visible", timeout=WAIT)
        assert "ovr-olga shell weekly: 3,000 → 30" in page.inner_text("#confirm-list")
        page.click("#confirm-yes")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#overrides-body tr')].some(r =>"
        " r.textContent.includes('ovr-olga') && r.textContent.includes('weekly'))",
        timeout=WAIT,
    )
    status, detail = server.call("GET", f"{API}/users/ovr-olga")
    assert detail["limits"]["shell"]["weekly"]["limit"] == 30
    assert detail["limits"]["shell"]["daily"]["limit"] == 40  # untouched

    # Within 10x of the user's own daily 40: no question.
    page.select_option("#override-period", "daily")
    page.fill("#override-limit", "50")
    with page.expect_response(lambda r: "/users/ovr-olga/limits/shell" in r.url, timeout=WAIT):
        page.click("#override-add")
    assert page.locator("#confirm-dialog").is_hidden()
    assert server.call("GET", f"{API}/users/ovr-olga")[1]["limits"]["shell"]["daily"]["limit"] == 50
    page.fill("#override-limit", "lots")
    page.click("#override-add")
    assert "whole number" in page.inner_text("#override-error")
    assert page.errors == []
