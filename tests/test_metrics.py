"""GET /metrics: scraped from a real server and parsed with prometheus-client's own parser."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
from clients import (
    ADMIN,
    METRICS,
    SERVICE,
    VIEWER,
    call,
    consume,
    login_post,
    settle,
    sse_connect,
    ws_connect,
)
from scrape import samples, scrape, value
from services import Server, start_server
from waits import wait_until, wait_until_async


@pytest.mark.gen_test(timeout=30)
async def test_metrics_token_or_admin_only(app_factory):
    app = await app_factory()
    assert (await call(app, "GET", "/metrics", token=None)).code == 401
    for token in (VIEWER, SERVICE):
        resp = await call(app, "GET", "/metrics", token=token)
        assert resp.code == 403, resp
        assert resp.json["error"]["code"] == "forbidden"
    await scrape(app, METRICS)
    await scrape(app, ADMIN)
    # A scraping token is not a way into the dashboard.
    login, _ = await login_post(app, METRICS)
    assert login.code == 401
    assert not [c for c in login.headers.get_list("Set-Cookie") if c.startswith("qs_session=")]


@pytest.mark.gen_test(timeout=30)
async def test_metrics_public_setting_opens_the_route(app_factory):
    app = await app_factory(metrics__public=True)
    await scrape(app, token=None)
    # Credentials are not needed, but a consume route stays closed to strangers.
    assert (await consume(app, "alice", token=None)).code == 401


@pytest.mark.gen_test(timeout=60)
async def test_every_metric_follows_what_happened(app_factory):
    # A band configured to 0 (the defaults never refuse): the overloaded path is counted.
    app = await app_factory(throttle__cpu_bands=[[98, 0.0], [80, 0.8]])
    await app.rules.set_global_limits("shell", {"daily": 3}, "test")
    before = await scrape(app)
    for result in ("allowed", "denied", "overloaded"):
        assert value(before, "quotaserver_decisions_total", result=result) == 0
    assert value(before, "quotaserver_stream_clients", transport="websocket") == 0

    ws = await ws_connect(app)
    await ws.recv_type("welcome")
    sse = await sse_connect(app)
    await sse.next_type("welcome")
    codes = [(await consume(app, "alice")).code for _ in range(5)]
    assert codes == [200, 200, 200, 429, 429]
    assert value(before, "quotaserver_throttle_refusals_total", resource="cpu") == 0
    app.load.update(99.5, 10.0)  # the top CPU band: factor 0, consumes refused
    assert (await consume(app, "bob")).code == 503
    app.load.update(10.0, 10.0)
    await settle(app)

    after = await scrape(app)
    assert value(after, "quotaserver_decisions_total", result="allowed") == 3
    assert value(after, "quotaserver_decisions_total", result="denied") == 2
    assert value(after, "quotaserver_decisions_total", result="overloaded") == 1
    assert value(after, "quotaserver_throttle_refusals_total", resource="cpu") == 1
    assert value(after, "quotaserver_throttle_refusals_total", resource="memory") == 0
    assert value(after, "quotaserver_consume_seconds_count") == 6
    assert value(after, "quotaserver_consume_seconds_bucket", le="+Inf") == 6
    assert value(after, "quotaserver_consume_seconds_sum") > 0
    assert value(after, "quotaserver_stream_clients", transport="websocket") == 1
    assert value(after, "quotaserver_stream_clients", transport="sse") == 1
    published = await app.store.run(_events_by_type)
    assert published["violation"] == 2
    for type_, count in published.items():
        assert value(after, "quotaserver_events_published_total", type=type_) == count
    assert value(after, "quotaserver_slow_consumer_closes_total") == app.hub.slow_closed == 0
    assert app.scheduler.sources, "the default plugins register sources"
    for name, health in app.scheduler.sources.items():
        expected = 1.0 if health.healthy else 0.0
        assert value(after, "quotaserver_source_up", source=name) == expected
    assert value(after, "quotaserver_throttle_factor") == 1.0
    assert value(after, "process_resident_memory_bytes") > 0
    assert value(after, "process_open_fds") > 0

    ws.close()
    await wait_until(lambda: app.hub.count("websocket") == 0, "the WebSocket client to leave")
    final = await scrape(app)
    assert value(final, "quotaserver_stream_clients", transport="websocket") == 0


@pytest.mark.gen_test(timeout=30)
async def test_database_errors_are_counted_by_kind(app_factory):
    app = await app_factory()
    app.metrics.db_error("busy")
    app.metrics.db_error("busy")
    assert value(await scrape(app), "quotaserver_db_errors_total", kind="busy") == 2


def _events_by_type() -> dict[str, int]:
    from quotaserver.models import Event

    counts: dict[str, int] = {}
    for row in Event.select(Event.type):
        counts[row.type] = counts.get(row.type, 0) + 1
    return counts


# -- several processes -------------------------------------------------------------------
async def _start(tmp_path, multiproc_dir: str, name: str) -> Server:
    env = {
        "QUOTASERVER_ADMIN_TOKEN": ADMIN,
        "QUOTASERVER_THROTTLE_CPU_BANDS": "[[100, 1.0]]",
        "QUOTASERVER_THROTTLE_MEMORY_BANDS": "[[100, 1.0]]",
        "QUOTASERVER_DATABASE_URL": f"sqlite:///{tmp_path}/shared.db",
        "QUOTASERVER_AUTH_TOKEN_FILE": f"{tmp_path}/token-{name}",
        "QUOTASERVER_AUTH_COOKIE_SECRET": "metrics-test-cookie-secret-0123456789",
        "PROMETHEUS_MULTIPROC_DIR": multiproc_dir,
    }
    return await start_server(str(tmp_path), {}, env=env)


@pytest.mark.gen_test(timeout=90)
async def test_several_processes_one_scrape_reports_them_all(tmp_path):
    """Two server processes sharing PROMETHEUS_MULTIPROC_DIR, as --workers runs them: a
    scrape of either sums the counters and the client gauges of both (no pid: the labels
    of one process) and lists each one's process figures by pid."""
    directory = str(tmp_path / "metrics")
    os.makedirs(directory)
    procs = [await _start(tmp_path, directory, name) for name in ("a", "b")]
    try:
        for i, proc in enumerate(procs):
            for n in range(i + 1):
                resp = await consume(proc, f"user{n}", token=ADMIN)
                assert resp.code == 200, resp
        ws = await ws_connect(procs[1])
        await ws.recv_type("welcome")
        for proc in procs:
            text = (await call(proc, "GET", "/metrics", token=ADMIN)).body.decode()
            got = samples(text)
            assert value(got, "quotaserver_decisions_total", result="allowed") == 3
            assert value(got, "quotaserver_consume_seconds_count") == 3
            clients = [labels for name, labels in got if name == "quotaserver_stream_clients"]
            assert sorted(clients) == [(("transport", "sse"),), (("transport", "websocket"),)]
            # Each worker's process figures, by pid, once it has sampled them (every second).
            await _until_scraped(proc, procs, "quotaserver_worker_resident_memory_bytes")
        # The other worker's client, as of its last refresh (every second).
        await wait_until_async(
            lambda: _scraped(procs[0], "quotaserver_stream_clients", 1, transport="websocket"),
            "the other worker's WebSocket client in the sum",
        )
        ws.close()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert await proc.wait(15) == 0


async def _scraped(proc, name: str, expected: float, **labels) -> bool:
    got = samples((await call(proc, "GET", "/metrics", token=ADMIN)).body.decode())
    return got.get((name, tuple(sorted(labels.items())))) == expected


async def _until_scraped(proc, workers, name: str, value: float | None = None, **labels) -> None:
    """Scrape ``proc`` until ``name`` has a sample for each worker's pid (equal to ``value``).

    Workers refresh their gauges every second, so another worker's figures arrive late.
    """
    deadline = asyncio.get_running_loop().time() + 10
    while True:
        got = samples((await call(proc, "GET", "/metrics", token=ADMIN)).body.decode())
        keys = [(name, tuple(sorted({"pid": str(w.pid), **labels}.items()))) for w in workers]
        if all(key in got and (value is None or got[key] == value) for key in keys):
            return
        assert asyncio.get_running_loop().time() < deadline, f"{name} never had every worker"
        await asyncio.sleep(0.1)
