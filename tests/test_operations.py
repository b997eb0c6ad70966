"""Operations (issue 22) through the real server: run.py processes on a temp SQLite file.

Each test starts its own ``run.py`` (tests/services.start_server) and talks to it over
real sockets; nothing is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import platform
import re
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator

import psutil
import pytest
from clients import METRICS, call, consume, sse_connect, ws_connect
from conftest import TOKENS
from prometheus_client.parser import text_string_to_metric_families
from services import (
    INITDB,
    REDIS,
    ROOT,
    Postgres,
    Redis,
    Server,
    needs,
    start_server,
    write_config,
)
from waits import wait_until, wait_until_async

from quotaserver import __version__


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
            print(f"\n[operations] busy host (cpu {load['cpu_percent']} %): 20 of 20 consumes "
                  f"200, throttle factors {sorted(factors)}")  # fmt: skip
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


# -- item 3: health answers within a second, whatever the database does ----------------------
async def timed_get(server: Server, path: str, answers: list) -> int:
    """GET ``path`` without credentials; keep (seconds taken, response) in ``answers``."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await call(server, "GET", path, token=None)
    answers.append((loop.time() - started, path, response))
    return response.code


@needs(INITDB is not None, reason="PostgreSQL server binaries not installed")
@pytest.mark.gen_test(timeout=120)
async def test_health_answers_within_a_second_while_postgresql_is_stopped(tmp_path):
    pytest.importorskip("psycopg2", reason="pip install psycopg2-binary (the test extras do)")
    pg = Postgres()
    pg.start()
    try:
        server = await start(
            tmp_path,
            {"database": {"url": pg.create_database()}, "throttle": {"source": "off"}},
        )
        answers: list = []
        assert await timed_get(server, "/api/health/ready", answers) == 200
        assert answers[-1][2].json == {
            "status": "ready",
            "checks": {"running": True, "database": True, "backplane": True, "plugins_failing": 0},
        }
        assert await timed_get(server, "/api/health/live", answers) == 200
        pg.pause()  # SIGSTOP: connections open, nothing answers (a call waits 12 s)
        try:

            async def not_ready() -> bool:
                return await timed_get(server, "/api/health/ready", answers) == 503

            await wait_until_async(not_ready, "readiness to report the hung database")
            assert answers[-1][2].json["checks"]["database"] is False
            assert answers[-1][2].json["status"] == "not_ready"
            assert await timed_get(server, "/api/health", answers) == 503
            assert answers[-1][2].json["database"] == {"reachable": False}
            assert await timed_get(server, "/api/health/live", answers) == 200
            slow = [(round(t, 3), path) for t, path, _ in answers if t >= 1.0]
            assert not slow, f"health answers over 1 s: {slow}"
            worst = max(t for t, _, _ in answers)
            print(f"\n[operations] PostgreSQL SIGSTOPped: {len(answers)} health answers, "
                  f"slowest {worst * 1000:.0f} ms")  # fmt: skip
        finally:
            pg.resume()

        async def ready() -> bool:
            return await timed_get(server, "/api/health/ready", answers) == 200

        await wait_until_async(ready, "readiness once PostgreSQL runs again", timeout=40)
        assert await timed_get(server, "/api/health", answers) == 200
        assert await server.stop() == 0
    finally:
        pg.destroy()


# -- item 6: one line per record, no driver text in answers, no traceback for bad paths -----
@pytest.mark.gen_test(timeout=60)
async def test_a_nul_in_a_static_path_is_a_400_envelope_and_one_log_line(tmp_path):
    server = await start(tmp_path, {"throttle": {"source": "off"}})
    try:
        for method in ("GET", "HEAD"):
            answer = await call(server, method, "/static/x%00", token=None)
            assert answer.code == 400, answer
            if method == "GET":
                assert answer.json == {
                    "error": {
                        "code": "invalid_path",
                        "message": "the path contains a control character",
                    }
                }
        assert (await call(server, "GET", "/static/favicon.svg", token=None)).code == 200
        await wait_until(
            lambda: sum("/static/x" in line for line in server.output) >= 2, "the access lines"
        )
    finally:
        assert await server.stop() == 0
    lines = [line for line in server.output if "/static/x" in line]
    assert len(lines) == 2, lines  # one per request: the access log's, at WARNING
    assert all(" WARNING tornado.access: 400 " in line for line in lines), lines
    assert not any("Traceback" in line or "ValueError" in line for line in server.output)


@needs(INITDB is not None, reason="PostgreSQL server binaries not installed")
@pytest.mark.gen_test(timeout=120)
async def test_a_driver_error_is_one_log_line_and_the_answer_names_only_its_id(tmp_path):
    pytest.importorskip("psycopg2", reason="pip install psycopg2-binary (the test extras do)")
    pg = Postgres()
    pg.start()
    try:
        server = await start(
            tmp_path,
            {
                "database": {"url": pg.create_database(), "connect_timeout": 1.0},
                "throttle": {"source": "off"},
            },
        )
        assert (await consume(server, "dora")).code == 200
        pg.stop()  # refused connections: psycopg2's text spans lines and names host and port
        answer = await consume(server, "dora")
        assert answer.code == 503, answer
        error = answer.json["error"]
        assert set(error) == {"code", "message", "error_id"}
        assert error["message"] == "the database is unavailable; retry later"
        assert str(pg.port) not in answer.body.decode() and "127.0.0.1" not in error["message"]
        ident = error["error_id"]
        await wait_until(
            lambda: any(ident in line for line in server.output), "the log line with the id"
        )
        pg.start()
        assert await server.stop() == 0
    finally:
        pg.destroy()
    (line,) = [line for line in server.output if ident in line]
    assert " WARNING " in line and "503 POST /api/quotas/consume" in line
    assert str(pg.port) in line  # the details are in the log, on this one line
    # From there on everything printed is a log record, and every one starts with its UTC
    # timestamp: no continuation line (psycopg2's "\tIs the server running...") of its own.
    after = server.output[server.output.index(line) :]
    assert all(re.match(r"\d{4}-\d\d-\d\dT", text) for text in after), after


# -- item 4: metrics that hold under workers -------------------------------------------------
def label_sets(samples: dict) -> dict[str, set[tuple[str, ...]]]:
    """quotaserver series: name -> the label names its samples carry."""
    out: dict[str, set[tuple[str, ...]]] = {}
    for name, labels in samples:
        if name.startswith("quotaserver_"):
            out.setdefault(name, set()).add(tuple(k for k, _ in labels))
    return out


async def exercise(server: Server) -> dict:
    """The same few requests on any server, then a scrape."""
    assert (await consume(server, "wendy")).code == 200
    assert (await call(server, "GET", "/api/health", token=None)).code == 200
    assert (await call(server, "GET", "/nowhere", token=None)).code == 404
    return await scrape(server)


@needs(REDIS is not None, reason="redis-server not installed")
@pytest.mark.gen_test(timeout=120)
async def test_metrics_under_two_workers_have_no_launcher_series_and_one_label_set(tmp_path):
    redis = Redis()
    redis.start()
    tmpdir = tmp_path / "tmp"  # where the launcher makes its quotaserver-metrics-* directory
    tmpdir.mkdir()
    config = {
        "database": {"url": f"sqlite:///{tmp_path}/shared.db"},
        "backplane": {"url": redis.url, "secret": "a-backplane-secret-for-tests-0123456789"},
        "throttle": {"source": "off"},
    }
    try:
        workers = await start(tmp_path, config, "--workers", "2", TMPDIR=str(tmpdir))
        try:
            (metrics_dir,) = [p for p in tmpdir.iterdir() if p.name.startswith("quotaserver-")]
            got = await exercise(workers)
            # Each scrape reaches one worker; the sums cover both, whichever answered.
            for _ in range(6):
                got = await scrape(workers)
                pids = {dict(labels).get("pid") for _, labels in got} - {None}
                assert str(workers.pid) not in pids, "a series of the launcher"
            build = (("python", platform.python_version()), ("version", __version__))
            assert got[("quotaserver_build_info", build)] == 1.0
            assert got[("quotaserver_throttle_factor", ())] == 1.0
            assert got[("quotaserver_backplane_connected", ())] == 1.0
            for outcome in ("received", "dropped", "rejected"):
                assert ("quotaserver_backplane_messages_total", (("outcome", outcome),)) in got
            assert ("quotaserver_backplane_lag_seconds", ()) in got
            health = (
                "quotaserver_http_requests_total",
                (("route", "/api/health"), ("status", "200")),
            )
            assert got[health] >= 1
            unmatched = (("route", "unmatched"), ("status", "404"))
            assert got[("quotaserver_http_requests_total", unmatched)] >= 1
            worker_pids = {
                dict(labels)["pid"]
                for name, labels in got
                if name == "quotaserver_worker_resident_memory_bytes"
            }
            assert len(worker_pids) <= 2 and str(workers.pid) not in worker_pids
            # SIGHUP reaches every worker through the launcher; all keep serving.
            workers.send_signal(signal.SIGHUP)
            await wait_until(
                lambda: len(printed(workers, "SIGHUP: configuration reloaded")) == 2,
                "both workers reloading",
            )
            assert (await consume(workers, "after-hup")).code == 200
        finally:
            assert await workers.stop() == 0
        assert not metrics_dir.exists(), "the launcher left its metrics directory behind"

        alone_dir = tmp_path / "one"
        alone_dir.mkdir()
        single = await start(
            alone_dir, {**config, "database": {"url": f"sqlite:///{alone_dir}/q.db"}}
        )
        try:
            alone = await exercise(single)
        finally:
            assert await single.stop() == 0
        assert label_sets(alone) == label_sets(got)
    finally:
        redis.kill()


# -- item 2: YAML limits mean something ------------------------------------------------------
def limits_config(tmp_path, daily: int, policy: str | None = None) -> dict:
    quotas: dict = {"defaults": {"shell": {"daily": daily, "weekly": 3000}}}
    if policy is not None:
        quotas["defaults_policy"] = policy
    return {
        "database": {"url": f"sqlite:///{tmp_path}/limits.db"},
        "throttle": {"source": "off"},
        "quotas": quotas,
    }


async def shell_daily_limit(server: Server) -> int | None:
    rules = await call(server, "GET", "/api/admin/quotas/rules")
    assert rules.code == 200, rules
    return rules.json["defaults"]["shell"]["daily"]


@pytest.mark.gen_test(timeout=120)
async def test_a_differing_yaml_default_is_warned_about_under_seed_and_applied_under_enforce(
    tmp_path,
):
    first = await start(tmp_path, limits_config(tmp_path, 500))
    assert await shell_daily_limit(first) == 500
    assert await first.stop() == 0

    seeded = await start(tmp_path, limits_config(tmp_path, 600))  # seed: the default policy
    try:
        assert await shell_daily_limit(seeded) == 500  # the database wins
    finally:
        assert await seeded.stop() == 0
    warnings = [line for line in seeded.output if "quotas.defaults." in line]
    assert len(warnings) == 1, warnings  # one per differing limit, weekly agrees
    assert " WARNING " in warnings[0]
    expected = "quotas.defaults.shell.daily: the configuration says 600, the database has 500"
    assert expected in warnings[0]

    enforced = await start(tmp_path, limits_config(tmp_path, 600, "enforce"))
    try:
        assert await shell_daily_limit(enforced) == 600  # the file wins
        audit = await call(enforced, "GET", "/api/admin/quotas/audit?actor=config")
        (row,) = audit.json["items"]
        assert (row["action"], row["target"]) == ("limits.update", "rule:shell:global")
        assert row["details"] == {  # the audit shows what the file changed, from and to
            "limits": {"daily": 600},
            "before": {"daily": 500},
            "after": {"daily": 600},
        }
    finally:
        assert await enforced.stop() == 0
    again = await start(tmp_path, limits_config(tmp_path, 600, "enforce"))
    try:  # nothing differs any more: no new change, no line
        audit = await call(again, "GET", "/api/admin/quotas/audit?actor=config")
        assert len(audit.json["items"]) == 1
    finally:
        assert await again.stop() == 0
    assert not [line for line in again.output if "quotas.defaults." in line]


# -- item 7: SIGHUP reloads without a restart ------------------------------------------------
def rewrite_config(tmp_path, settings: dict) -> None:
    """Replace the YAML the running server was started with (its only config-*.yaml)."""
    (path,) = tmp_path.glob("config-*.yaml")
    write_config(str(path), {"auth": {"tokens": TOKENS}, **settings})


def printed(server: Server, text: str) -> list[str]:
    """The lines the server printed so far that contain ``text``."""
    return [line for line in server.output if text in line]


@pytest.mark.gen_test(timeout=120)
async def test_sighup_keeps_dashboards_connected_and_applies_a_new_log_level(tmp_path):
    base = {
        **limits_config(tmp_path, 500),
        "realtime": {"heartbeat_interval": 0.2},
        "server": {"log_level": "info"},
    }
    access = "tornado.access: 200 GET /api/health"
    server = await start(tmp_path, base)
    try:
        ws = await ws_connect(server)
        await ws.recv_type("welcome")
        sse = await sse_connect(server)
        await sse.next_type("welcome")
        assert (await call(server, "GET", "/api/health", token=None)).code == 200
        assert printed(server, access) == []  # info: successful requests are not logged

        enforce = limits_config(tmp_path, 42, "enforce")
        rewrite_config(
            tmp_path, {**base, **enforce, "server": {"log_level": "debug", "max_body_size": 2048}}
        )
        server.send_signal(signal.SIGHUP)
        await wait_until(lambda: printed(server, "SIGHUP: configuration reloaded"), "the reload")
        assert (await call(server, "GET", "/api/health", token=None)).code == 200
        await wait_until(lambda: printed(server, access), "an access line at the new level")
        # enforce: the file's limit, applied after the reload line (pushed, then read back)
        change = await ws.recv_type("quota_change")
        assert change["data"]["limits"] == {"daily": 42} and change["data"]["actor"] == "config"
        assert await shell_daily_limit(server) == 42
        # A setting that is not reloadable is named as waiting for a restart.
        assert printed(server, "at the next restart: server.max_body_size"), server.output

        (path,) = tmp_path.glob("config-*.yaml")
        path.write_text("server: {log_level: loud}\n")  # invalid: nothing changes
        server.send_signal(signal.SIGHUP)
        await wait_until(lambda: printed(server, "configuration not reloaded"), "the refusal")
        assert "server.log_level" in printed(server, "configuration not reloaded")[0]
        # Both dashboards are still connected and still served.
        await ws.recv_type("ping")
        await sse.next_type("ping")
        assert ws.conn.close_code is None
        assert (await consume(server, "hal")).code == 200
    finally:
        assert await server.stop() == 0


# -- item 5: check-config --connect shows the limits in force --------------------------------
@pytest.mark.gen_test(timeout=120)
async def test_check_config_connect_shows_the_limits_in_force(tmp_path):
    first = await start(tmp_path, limits_config(tmp_path, 500))
    assert await first.stop() == 0
    config = write_config(str(tmp_path / "changed.yaml"), limits_config(tmp_path, 600))
    checked = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quotaserver", "check-config", "--config", config, "--connect",
        cwd=str(tmp_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(checked.communicate(), 60)
    assert checked.returncode == 0, err.decode()
    text = out.decode()
    assert "# limits in force (the database's global defaults)" in text
    assert "#   shell: daily 500 (the file says 600), weekly 3000, monthly unlimited" in text
    assert "quotas.defaults_policy: seed: the file's differing limits are not enforced" in text


# -- item 8: a real version -------------------------------------------------------------------
@pytest.mark.gen_test(timeout=60)
async def test_the_version_is_the_package_metadata_and_has_a_changelog_entry(tmp_path):
    installed = importlib.metadata.version("quotaserver")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        assert tomllib.load(fh)["project"]["version"] == installed == __version__
    with open(os.path.join(ROOT, "CHANGELOG.md"), encoding="utf-8") as fh:
        headings = re.findall(r"^## (\S+)", fh.read(), re.M)
    assert installed in headings, headings
    shown = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "quotaserver", "--version", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await shown.communicate()
    assert out.decode().strip() == f"quotaserver {installed}"
    server = await start(tmp_path, {"throttle": {"source": "off"}})
    try:
        health = await call(server, "GET", "/api/ws/health")
        assert health.json["version"] == installed
    finally:
        assert await server.stop() == 0


@needs(REDIS is not None, reason="redis-server not installed")
@pytest.mark.gen_test(timeout=120)
async def test_a_worker_that_dies_is_replaced_and_sigterm_stops_all_with_0(tmp_path):
    redis = Redis()
    redis.start()
    config = {
        "database": {"url": f"sqlite:///{tmp_path}/shared.db"},
        "backplane": {"url": redis.url, "secret": "a-backplane-secret-for-tests-0123456789"},
        "throttle": {"source": "off"},
    }
    config["database"]["pool_size"] = 8
    workers = await start(tmp_path, config, "--workers", "2")
    try:
        for _ in range(4):  # the deployment's pool, divided: 8 / 2 workers, half for reads
            health = await call(workers, "GET", "/api/ws/health")
            assert health.json["database"]["pool"] == {"writers": 1, "readers": 2}, health.json
        launcher = psutil.Process(workers.pid)
        first = {child.pid for child in launcher.children()}
        assert len(first) == 2
        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        await wait_until(
            lambda: len({c.pid for c in launcher.children()} - first) == 1,
            "a new worker in place of the killed one",
        )
        line = f"(pid {victim}) exited with -9; starting a new one"
        await wait_until(lambda: printed(workers, line), "the replacement in the log")
        now = {child.pid for child in launcher.children()}
        assert victim not in now and len(now) == 2
        for n in range(6):  # whichever worker answers, each decides
            assert (await consume(workers, f"after-{n}")).code == 200
        assert await workers.stop() == 0
        assert not any(psutil.pid_exists(pid) for pid in now)
    finally:
        workers.kill()
        redis.kill()
