"""axe-core on every dashboard view, at desktop and phone width and in the light theme: no
serious or critical finding (issue 25, item 8); arrow keys move between the tabs; one live
region announces; the day's zone is labelled; reduced motion stops animations."""

from __future__ import annotations

import os
from typing import Any

import pytest

from .support import API, WAIT

pytestmark = pytest.mark.browser

AXE = os.path.join(os.path.dirname(__file__), "vendor", "axe-core", "axe.min.js")
VIEWPORTS = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}


def axe_findings(page: Any) -> list[str]:
    """Serious and critical axe-core violations of the page as it is now."""
    if not page.evaluate("() => typeof window.axe === 'object'"):
        # evaluate() runs outside the page's CSP, which (rightly) refuses injected scripts.
        with open(AXE, encoding="utf-8") as fh:
            page.evaluate(fh.read() + "\n;undefined")
    results = page.evaluate(
        "async () => (await axe.run(document, {resultTypes: ['violations']})).violations"
    )
    return [
        f"{v['id']} ({v['impact']}): {v['help']} -- "
        + "; ".join(n["target"][0] if n["target"] else "?" for n in v["nodes"][:5])
        for v in results
        if v["impact"] in ("serious", "critical")
    ]


@pytest.mark.parametrize(
    ("width", "scheme"), [("desktop", "dark"), ("phone", "dark"), ("desktop", "light")]
)
def test_no_serious_axe_finding_on_any_view(server, open_dashboard, width, scheme):
    name = f"axe-ava-{width}-{scheme}"  # the module shares one server
    server.set_user_limit(name, 1)
    assert [server.consume(name) for _ in range(2)] == [200, 429]
    page = open_dashboard(server, viewport=VIEWPORTS[width], context={"color_scheme": scheme})
    background = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
    assert background == ("rgb(241, 245, 249)" if scheme == "light" else "rgb(15, 23, 42)")
    page.wait_for_selector("#violations-feed li", timeout=WAIT)
    found: dict[str, list[str]] = {}
    found["live"] = axe_findings(page)
    for tab in ("users", "rules", "audit"):
        page.click(f"#tab-{tab}")
        page.wait_for_selector(f"#panel-{tab} tbody tr", timeout=WAIT)
        found[tab] = axe_findings(page)
    page.click("#tab-users")
    page.fill("#users-search", name)
    page.locator(f"#users-body tr[data-username='{name}']").wait_for(timeout=WAIT)
    page.click(f"#users-body tr[data-username='{name}'] button:has-text('Edit limits')")
    page.locator("#limits-dialog").wait_for(state="visible", timeout=WAIT)
    found["limits dialog"] = axe_findings(page)
    page.click("#limits-cancel")
    page.goto(f"{server.url}/admin/quotas/users/{name}")
    page.locator("#user-limits-body tr").first.wait_for(timeout=WAIT)
    found["user page"] = axe_findings(page)
    problems = {view: f for view, f in found.items() if f}
    assert problems == {}, "\n".join(f"{v}: {x}" for v, fs in problems.items() for x in fs)


def test_arrow_keys_move_between_tabs_and_one_live_region_announces(server, open_dashboard):
    page = open_dashboard(server)
    page.focus("#tab-live")
    page.keyboard.press("ArrowRight")
    assert page.evaluate("() => document.activeElement.id") == "tab-users"
    assert page.get_attribute("#tab-users", "aria-selected") == "true"
    assert page.locator("#panel-users").is_visible()
    page.keyboard.press("End")
    assert page.evaluate("() => document.activeElement.id") == "tab-audit"
    page.keyboard.press("ArrowRight")  # wraps around
    assert page.evaluate("() => document.activeElement.id") == "tab-live"
    page.keyboard.press("ArrowLeft")
    assert page.evaluate("() => document.activeElement.id") == "tab-audit"
    # Only the selected tab is in the Tab order (roving tabindex).
    tabindex = "() => [...document.querySelectorAll('[role=tab]')].map(t => t.tabIndex)"
    assert page.evaluate(tabindex) == [-1, -1, -1, 0]

    # Announcements go through one polite live region, not one per feed or toast.
    live = page.evaluate(
        "() => [...document.querySelectorAll('[aria-live]')].map(n => n.id || n.className)"
    )
    assert live == ["announcer"]
    server.set_user_limit("announce-al", 0)
    assert server.consume("announce-al") == 429
    page.wait_for_function(
        "() => document.getElementById('announcer').textContent.includes('announce-al')",
        timeout=WAIT,
    )
    status, _ = server.call("GET", f"{API}/stats")
    assert status == 200


def test_the_day_boundary_zone_is_labelled_and_reduced_motion_stops_animations(
    server, open_dashboard
):
    context = {"timezone_id": "America/New_York", "reduced_motion": "reduce"}
    page = open_dashboard(server, context=context)
    note = page.inner_text("#zone-note")
    assert "the day in UTC" in note and "America/New_York" in note
    server.set_user_limit("motion-mo", 0)
    assert server.consume("motion-mo") == 429
    page.wait_for_selector("#violations-feed li.violation", timeout=WAIT)
    animations = page.evaluate(
        "() => [document.querySelector('#violations-feed li.violation'),"
        " document.querySelector('.toast')].filter(Boolean)"
        ".map(n => getComputedStyle(n).animationName)"
    )
    assert animations and set(animations) == {"none"}

    # Without the preference the arrival is animated (the check above can fail).
    moving = open_dashboard(server, context={"reduced_motion": "no-preference"})
    server.set_user_limit("motion-mo2", 0)
    assert server.consume("motion-mo2") == 429
    moving.wait_for_selector("#violations-feed li.violation", timeout=WAIT)
    name = moving.evaluate(
        "() => getComputedStyle(document.querySelector('#violations-feed li.violation'))"
        ".animationName"
    )
    assert name == "arrive"
