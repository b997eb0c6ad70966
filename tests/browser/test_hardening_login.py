"""Issue 12 in a real browser: the start-up link signs in once, and leaves no code behind.

``run.py`` with no admin configured prints ``/login#code=...``; Chromium opens it, the login
page POSTs the code from the fragment with its XSRF field, and the dashboard appears. The
code is gone from the address bar and the history, and the same link does not work twice.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from typing import Any

import pytest
from services import needs

from .support import CHROMIUM, ROOT, WAIT

pytestmark = pytest.mark.browser


@pytest.fixture
def first_run(tmp_path: Any):
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTASERVER_")}
    env["QUOTASERVER_SERVER_PORT"] = "0"
    out = tmp_path / "stdout.log"
    with open(out, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "run.py")],
            cwd=str(tmp_path), env=env, stdout=fh, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (link := re.search(r"http://\S+/login#code=\S+", out.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        yield link.group(0)
    finally:
        proc.send_signal(2)
        proc.wait(15)


@needs(os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}")
def test_the_start_up_link_signs_in_once_and_leaves_no_code_behind(browser, first_run):
    link = first_run
    code = link.split("#code=", 1)[1]
    context = browser.new_context()
    try:
        page = context.new_page()
        requests: list[str] = []
        page.on(
            "request",
            lambda request: requests.append(request.url + request.headers.get("referer", "")),
        )
        page.goto(link)
        page.wait_for_url("**/admin/quotas", timeout=WAIT)
        page.wait_for_selector("#conn[data-state=connected]", timeout=WAIT)
        page.go_back()
        page.wait_for_load_state()
        assert code not in page.url
        # The code never left the browser in a URL or a Referer (only in the POST body).
        assert not [r for r in requests if code in r]
        # The same link in a fresh browser: the code is spent.
        other = browser.new_context()
        try:
            again = other.new_page()
            again.goto(link)
            again.wait_for_selector(".error", timeout=WAIT)
            assert "/login" in again.url and code not in again.url
            cookies = {c["name"] for c in other.cookies()}
            assert "qs_session" not in cookies
        finally:
            other.close()
    finally:
        context.close()
