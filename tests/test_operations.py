"""Operations (issue 22) through the real server: run.py processes on a temp SQLite file.

Each test starts its own ``run.py`` (tests/services.start_server) and talks to it over
real sockets; nothing is mocked.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from clients import METRICS, call, consume
from conftest import TOKENS
from prometheus_client.parser import text_string_to_metric_families
from services import Server, start_server
from waits import wait_until_async


async def start(tmp_path, config: dict | None = None, *args: str, **env: str) -> Server:
    """run.py in ``tmp_path`` with the test tokens and ``config`` (a YAML mapping)."""
    settings = {"auth": {"tokens": TOKENS}, **(config or {})}
    return await start_server(str(tmp_path), settings, *args, env=env)


async def scrape(server: Server) -> dict[tuple[str, tuple], float]:
    metrics = await call(server, "GET", "/metrics", token=METRICS)
    assert metrics.code == 200, metrics
    return scrape_samples(metrics.body.decode())


def scrape_samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@contextlib.contextmanager
def busy_cores() -> Iterator[list[subprocess.Popen]]:
    """A CPU-bound helper process on every core, for the ``with`` block only."""
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(os.cpu_count() or 1)
    ]
    try:
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


# -- item 1: a busy host does not deny everyone ----------------------------------------------
@pytest.mark.gen_test(timeout=90)
async def test_a_busy_host_slows_consumes_but_refuses_none_under_the_default_bands(tmp_path):
    # The default bands and source (host); samples every 0.2 s and no hold, so the test
    # sees the saturated machine's band at once (the hold is test_throttle.py's subject).
    server = await start(
        tmp_path,
        {"throttle": {"hold_seconds": 0}, "plugins": {"system_metrics": {"interval": 0.2}}},
        QUOTASERVER_SERVER_LOG_LEVEL="warning",
    )
    try:
        with busy_cores():
            load: dict = {}

            async def saturated() -> bool:
                stats = await call(server, "GET", "/api/admin/quotas/stats")
                load.update(stats.json["stats"].get("system_load") or {})
                return load.get("cpu_percent", 0) >= 98

            # The former defaults had factor 0 from 98 %: every consume was refused here.
            await wait_until_async(saturated, f"host CPU at 98 % or more (last {load})")
            answers = [await consume(server, f"busy-{i}") for i in range(20)]
            assert [a.code for a in answers] == [200] * 20, answers
            factors = {a.json["throttle_factor"] for a in answers}
            assert factors and all(0.25 <= f < 1.0 for f in factors), factors
        samples = await scrape(server)
        for resource in ("cpu", "memory"):
            key = ("quotaserver_throttle_refusals_total", (("resource", resource),))
            assert samples[key] == 0
    finally:
        assert await server.stop() == 0


@pytest.mark.gen_test(timeout=60)
async def test_a_band_configured_to_zero_refuses_and_counts_the_refusal(tmp_path):
    # Every sample is at or above 0 %: the operator's band 0 refuses from the first sample.
    server = await start(
        tmp_path,
        {
            "throttle": {"hold_seconds": 0, "cpu_bands": [[0, 0.0]]},
            "plugins": {"system_metrics": {"interval": 0.2}},
        },
        QUOTASERVER_SERVER_LOG_LEVEL="warning",
    )
    try:
        answers = []

        async def refused() -> bool:
            answers.append(await consume(server, "shed"))
            return answers[-1].code == 503

        await wait_until_async(refused, "a consume refused by the band at 0")
        assert answers[-1].json["reason"] == "system_overloaded"
        assert all(a.code == 200 for a in answers[:-1]), answers  # before the first sample
        samples = await scrape(server)
        assert samples[("quotaserver_throttle_refusals_total", (("resource", "cpu"),))] == 1
        assert samples[("quotaserver_throttle_refusals_total", (("resource", "memory"),))] == 0
    finally:
        assert await server.stop() == 0
