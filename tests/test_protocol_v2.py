"""Protocol 2 on the wire: welcome.protocol, alert.action_needed (bool) and alert.action."""

from __future__ import annotations

import pytest
from clients import call, sse_connect, ws_connect

API = "/api/admin/quotas"


@pytest.mark.gen_test(timeout=30)
async def test_welcome_says_protocol_2_on_both_transports(app_factory):
    app = await app_factory()
    ws = await ws_connect(app)
    assert (await ws.recv_type("welcome"))["data"]["protocol"] == 2
    sse = await sse_connect(app)
    assert (await sse.next_type("welcome"))["message"]["data"]["protocol"] == 2


@pytest.mark.gen_test(timeout=30)
async def test_action_needed_is_a_boolean_and_the_advice_is_in_action(app_factory):
    app = await app_factory(dev=True)
    ws = await ws_connect(app)
    await ws.recv_type("welcome")
    resp = await call(app, "POST", "/api/ws/test-alert", {"severity": "high", "message": "m"})
    assert resp.code == 200, resp
    live = (await ws.recv_type("alert"))["data"]
    assert live["action_needed"] is True
    assert live["action"] == "None: this is a test alert"
    await app.alerts.raise_alert("custom", "low", "nothing to do here")
    quiet = (await ws.recv_type("alert"))["data"]
    assert quiet["action_needed"] is False and quiet["action"] is None
    listed = (await call(app, "GET", f"{API}/alerts")).json["items"]
    by_type = {a["alert_type"]: a for a in listed}
    assert by_type["test"]["action_needed"] is True
    assert by_type["test"]["action"] == live["action"]
    assert by_type["custom"]["action_needed"] is False and by_type["custom"]["action"] is None
