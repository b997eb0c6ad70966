"""The system-metrics plugin on the real machine: psutil samples feed the throttle factor
and a durable ``throttle`` event marks every change of band.

The real CPU and memory figures are unknown in advance, so the bands are chosen to be
reached by any figure (threshold 0) or by none (above 100): the outcome is exact.
"""

import pytest
from clients import consume, ws_connect
from conftest import make_config
from waits import wait_until

from quotaserver.config import ConfigError
from quotaserver.plugins import get_plugin_manager
from quotaserver.throttle import Bands

ALWAYS = {"throttle__cpu_bands": [[0, 0.5]], "throttle__memory_bands": [[0, 0.8]]}


async def metrics_app(app_factory):
    # A long interval: the scheduler samples once at start, the test runs the rest.
    return await app_factory(
        plugins={"system_metrics": {"enabled": True, "interval": 3600}}, **ALWAYS
    )


@pytest.mark.gen_test(timeout=30)
async def test_a_change_of_band_is_one_throttle_event_and_reaches_decisions(app_factory):
    app = await metrics_app(app_factory)
    await wait_until(lambda: app.scheduler.sources["system_metrics"].runs == 1, "the first sample")
    ws = await ws_connect(app, "last_seq=0&types=throttle,stats")
    event = await ws.recv_type("throttle")
    sample = app.load.current
    assert event["data"] == {
        "throttle_factor": 0.5,  # the lower of the CPU and the memory band
        "previous_factor": 1.0,
        "cpu_percent": sample.cpu_percent,
        "memory_percent": sample.memory_percent,
        "throttle_active": True,
    }
    assert 0.0 <= sample.cpu_percent <= 100.0 and 0.0 < sample.memory_percent <= 100.0
    assert (await ws.recv_type("recovered"))["data"]["missed"] == 1
    head = app.hub.last_seq

    # Same band again: nothing is published.
    await app.scheduler.run_once("system_metrics")
    assert app.scheduler.sources["system_metrics"].runs == 2
    assert app.hub.last_seq == head

    decision = (await consume(app, "tia")).json
    assert decision["throttle_factor"] == 0.5
    assert app.stats_snapshot()["system_load"]["throttle_active"] is True

    # Load falls below every band: one event back to 1.0. (Above 100 + the 5-point
    # hysteresis: a sample over a few busy milliseconds can read 100 %, and leaving a band
    # needs the load that far below it.)
    app.load.cpu_bands = app.load.memory_bands = Bands([[106, 0.0]])
    await app.scheduler.run_once("system_metrics")
    back = await ws.recv_type("throttle")
    assert back["seq"] > head
    assert (back["data"]["throttle_factor"], back["data"]["previous_factor"]) == (1.0, 0.5)
    assert back["data"]["throttle_active"] is False
    assert (await consume(app, "tia")).json["throttle_factor"] == 1.0
    ws.close()


def test_its_interval_is_validated(tmp_path):
    config = make_config(tmp_path, plugins={"system_metrics": {"interval": -1}})
    with pytest.raises(ConfigError, match=r"plugins\.system_metrics\.interval"):
        get_plugin_manager(config)
    config = make_config(tmp_path, plugins={"system_metrics": {"speed": 1}})
    with pytest.raises(ConfigError, match=r"plugins\.system_metrics\.speed"):
        get_plugin_manager(config)
