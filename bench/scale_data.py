"""Scale of data: a million users, and no admin page ever stalls a quota decision.

Fills a database with ``--users`` users and about five usage rows each through the
project's own consume path (``QuotaService._consume_sync``: the same counters, daily peaks,
per-minute activity and violation rows a real consume writes), then measures against
``run.py`` serving that database:

- the users page p99 over every sort, first and deep (cursor) pages, and prefix search;
- consume p99 alone, and while 10 clients page the users list continuously;
- start-up time of ``run.py`` (spawn to "listening on");
- the stats tick (``app.stats_snapshot()`` in-process, after start-up);
- the database size per million users.

The fill is cached: the database lives under ``bench/out/scale/`` (or ``--database-url``)
and a re-run continues from the last committed batch, so only the first run pays for it.
Usage rows count only for the day they were written on, so a database filled on an earlier
day is refilled (pass ``--keep-stale`` to measure it anyway).

    python bench/scale_data.py                      # 1M users on SQLite (fills once)
    python bench/scale_data.py --users 20000        # smaller
    python bench/scale_data.py --database-url postgresql://user@host/db
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from typing import Any

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from common import TOKEN, HttpClient, free_port, machine, percentile, stop_process  # noqa: E402

from quotaserver.config import load_config  # noqa: E402
from quotaserver.db import Store  # noqa: E402
from quotaserver.models import Usage, User  # noqa: E402
from quotaserver.quota import QuotaService  # noqa: E402
from quotaserver.throttle import SystemLoad  # noqa: E402

COMMANDS = ["shell", "code", "test", "review", "refactor"]
BATCH = 2000  # users per fill transaction
PAGE_CLIENTS = 10
PACE = 0.5  # seconds between two pages of a paced client (a person paging quickly)


def username(i: int) -> str:
    # Mixed case and a spread of prefixes, so search and case-insensitive order do work.
    return f"{'AbCdEfGhIjKlMnOpQrStUvWxYz'[i % 26]}user{i:07d}"


def plan(i: int) -> list[tuple[str, int]]:
    """The consumes of user ``i``: two command types for two users in three (3 periods ->
    5 usage rows per user on average); counts spread utilisation from ~0 to over 100%."""
    rng = random.Random(i)
    first = COMMANDS[i % len(COMMANDS)]
    steps = [(first, rng.randint(1, 220))]
    if i % 3:
        steps.append((COMMANDS[(i + 2) % len(COMMANDS)], rng.randint(1, 220)))
    return steps


# -- fill -------------------------------------------------------------------------------
def sqlite_path(url: str) -> str | None:
    if not url.startswith("sqlite:"):
        return None
    path = url.removeprefix("sqlite:").removeprefix("//")
    return path[1:] if path.startswith("/") else path


def open_service(url: str) -> tuple[Store, QuotaService]:
    config = load_config(env={}, overrides={"database.url": url})
    store = Store(url, "off")
    store.migrate()
    quota = QuotaService(config, store, SystemLoad.from_config(config))
    quota.seed_defaults()
    return store, quota


def fill(url: str, users: int, log: Any = print) -> dict[str, Any]:
    """Create users ``0..users-1`` (resuming after the last committed batch)."""
    store, quota = open_service(url)
    db = store.db
    if store.is_sqlite:
        db.execute_sql("PRAGMA cache_size = -262144")  # 256 MiB for this connection
    try:
        today = quota.calendar.window("daily", quota.clock()).key
        done = User.select().count()
        if done:
            day = Usage.select(Usage.window_start).where(Usage.period == "daily").scalar()
            if day != today:
                raise StaleFill(f"filled on day {day}, today is {today}")
        started, start_count = time.perf_counter(), done
        while done < users:
            end = min(done + BATCH, users)
            with db.atomic():
                for i in range(done, end):
                    for command_type, count in plan(i):
                        quota._consume_sync(username(i), command_type, count, 1.0)
            done = end
            rate = (done - start_count) / (time.perf_counter() - started)
            if done % (BATCH * 25) == 0 or done == users:
                log(f"fill: {done}/{users} users ({rate:.0f} users/s)")
        return {"users": User.select().count(), "usage_rows": Usage.select().count()}
    finally:
        store.close()


class StaleFill(Exception):
    pass


# -- measurements -----------------------------------------------------------------------
class RunningServer:
    def __init__(self, url: str, workdir: str):
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTASERVER_")}
        env.update(
            {
                "QUOTASERVER_ADMIN_TOKEN": TOKEN,
                "QUOTASERVER_SERVER_LOG_LEVEL": "warning",
                "QUOTASERVER_DATABASE_URL": url,
            }
        )
        self.log_path = os.path.join(workdir, "server.log")
        t0 = time.perf_counter()
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "run.py"), "--port", str(self.port)],
                cwd=workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.time() + 120
        while time.time() < deadline:
            with open(self.log_path) as fh:
                text = fh.read()
            if "listening on" in text:
                self.startup = time.perf_counter() - t0
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        self.stop()
        raise RuntimeError(f"server did not start:\n{text}")

    def busy(self, run: Any) -> dict[str, Any]:
        """Run the coroutine ``run``; add the server's CPU use meanwhile (100 = one core)."""
        proc = psutil.Process(self.proc.pid)
        before, t0 = proc.cpu_times(), time.perf_counter()
        result = asyncio.run(run)
        after, took = proc.cpu_times(), time.perf_counter() - t0
        cpu = (after.user + after.system - before.user - before.system) / took
        return {**result, "server_cpu_percent": round(100 * cpu)}

    def stop(self) -> None:
        stop_process(self.proc)


class Client(HttpClient):
    async def get(self, path: str) -> tuple[int, bytes]:
        self.writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {TOKEN}\r\n\r\n".encode()
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
        return status, await self.reader.readexactly(length)


async def get_json(http: Client, path: str) -> tuple[int, dict, float]:
    t0 = time.perf_counter()
    status, body = await http.get(path)
    took = time.perf_counter() - t0
    return status, (json.loads(body) if body else {}), took


async def users_pages(port: int, users: int, rounds: int) -> dict[str, Any]:
    """Every sort x (first page, deep page via cursor, search) ``rounds`` times."""
    http = Client(port)
    await http.open()
    rng = random.Random(7)
    timings: dict[str, list[float]] = {}
    base = "/api/admin/quotas/users?per_page=25"
    try:
        for sort in ("utilization", "username"):
            for _ in range(rounds):
                status, first, took = await get_json(http, f"{base}&sort={sort}")
                assert status == 200, (status, first)
                timings.setdefault(f"{sort} first page", []).append(took)
                cursor = first["next_cursor"]
                # Deep pages: follow the cursor for a few pages from a random start.
                start = rng.randrange(max(1, users - 100))
                q = f"&q={username(start)[:1]}user{start:07d}"[:-2]  # a prefix: ~100 users
                status, page, took = await get_json(http, f"{base}&sort={sort}{q}")
                assert status == 200, (status, page)
                timings.setdefault(f"{sort} search (prefix)", []).append(took)
                for _ in range(3):
                    if cursor is None:
                        break
                    status, page, took = await get_json(http, f"{base}&sort={sort}&cursor={cursor}")
                    assert status == 200, (status, page)
                    timings.setdefault(f"{sort} next page (cursor)", []).append(took)
                    cursor = page["next_cursor"]
                # A page far down the list: the cursor of a row in the middle.
                middle = _cursor_at(sort, username(rng.randrange(users)))
                if middle:
                    status, page, took = await get_json(http, f"{base}&sort={sort}&cursor={middle}")
                    assert status == 200, (status, page)
                    timings.setdefault(f"{sort} deep page (cursor)", []).append(took)
    finally:
        http.close()
    every = [t for ts in timings.values() for t in ts]
    rows = {
        k: {"n": len(v), "p50_ms": _ms(statistics.median(v)), "p99_ms": _ms(percentile(v, 0.99))}
        for k, v in timings.items()
    }
    return {"by_request": rows, "p99_ms": _ms(percentile(every, 0.99)), "requests": len(every)}


def _cursor_at(sort: str, name: str) -> str | None:
    from quotaserver.cursors import encode_cursor

    if sort == "username":
        return encode_cursor({"n": name})
    return encode_cursor({"r": -50.0, "n": name})


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


async def consume_run(
    port: int, users: int, seconds: float, pagers: int, pace: float = 0.0
) -> dict[str, Any]:
    """Consume p99 from 4 sequential clients over random existing users, while ``pagers``
    clients page the users list (by utilisation or name, following cursors) continuously,
    or one page every ``pace`` seconds each."""
    stop_at = time.perf_counter() + seconds
    latencies: list[float] = []
    pages = 0

    async def consumer(seed: int) -> None:
        rng = random.Random(seed)
        http = Client(port)
        await http.open()
        try:
            while time.perf_counter() < stop_at:
                body = json.dumps(
                    {"user": username(rng.randrange(users)), "command_type": rng.choice(COMMANDS)}
                ).encode()
                t0 = time.perf_counter()
                status, _ = await http.post("/api/quotas/consume", body)
                latencies.append(time.perf_counter() - t0)
                assert status in (200, 429), status
        finally:
            http.close()

    async def pager(seed: int) -> None:
        nonlocal pages
        http = Client(port)
        await http.open()
        sort = ("utilization", "username")[seed % 2]
        cursor = None
        try:
            while time.perf_counter() < stop_at:
                path = f"/api/admin/quotas/users?per_page=25&sort={sort}"
                status, page, _ = await get_json(
                    http, path + (f"&cursor={cursor}" if cursor else "")
                )
                assert status == 200, status
                cursor = page.get("next_cursor")
                pages += 1
                if pace:
                    await asyncio.sleep(pace)
        finally:
            http.close()

    tasks = [consumer(s) for s in range(4)] + [pager(s) for s in range(pagers)]
    await asyncio.gather(*tasks)
    return {
        "consumes": len(latencies),
        "pages": pages,
        "p50_ms": _ms(statistics.median(latencies)),
        "p99_ms": _ms(percentile(latencies, 0.99)),
    }


def stats_tick(url: str, samples: int = 2000) -> dict[str, Any]:
    """Start the app in-process on the database and time ``stats_snapshot()``."""
    from quotaserver.app import QuotaApp

    async def scenario() -> dict[str, Any]:
        config = load_config(env={}, overrides={"database.url": url, "server.port": free_port()})
        app = QuotaApp(config)
        t0 = time.perf_counter()
        await app.start(listen=False)
        started = time.perf_counter() - t0
        try:
            times = []
            for _ in range(samples):
                t = time.perf_counter()
                app.stats_snapshot()
                times.append(time.perf_counter() - t)
            snap = app.stats_snapshot()
        finally:
            await app.stop()
        return {
            "app_start_s": round(started, 3),
            "p50_ms": round(statistics.median(times) * 1000, 4),
            "p99_ms": round(percentile(times, 0.99) * 1000, 4),
            "total_users": snap.get("total_users"),
            "high_utilization_count": snap.get("high_utilization_count"),
        }

    return asyncio.run(scenario())


def database_size(url: str) -> int:
    path = sqlite_path(url)
    if path is not None:
        return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))
    import peewee

    store = Store(url)
    try:
        name = store.db.database
        cur = store.db.execute_sql("SELECT pg_database_size(%s)", (name,))
        return int(cur.fetchone()[0])
    except peewee.PeeweeException:
        return 0
    finally:
        store.close()


def run(
    users: int,
    url: str,
    *,
    rounds: int = 20,
    seconds: float = 10.0,
    startups: int = 3,
    log: Any = print,
) -> dict[str, Any]:
    path = sqlite_path(url)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    t0 = time.perf_counter()
    counts = fill(url, users, log)
    fill_s = time.perf_counter() - t0
    log(f"data: {counts} (fill this run: {fill_s:.0f} s)")
    workdir = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()
    result: dict[str, Any] = {"users": users, **counts, "database": url.split(":")[0]}
    result["db_bytes"] = database_size(url)
    result["db_mb_per_million_users"] = round(result["db_bytes"] / 1e6 / (users / 1e6), 1)

    result["stats_tick"] = stats_tick(url)
    log(f"stats tick: {result['stats_tick']}")

    startup_times = []
    for n in range(startups):
        server = RunningServer(url, workdir)
        startup_times.append(server.startup)
        if n < startups - 1:
            server.stop()
    result["startup_s"] = [round(s, 2) for s in startup_times]
    log(f"start-up: {result['startup_s']}")
    try:
        asyncio.run(users_pages(server.port, users, 2))  # warm-up: caches, first full count
        result["users_page"] = asyncio.run(users_pages(server.port, users, rounds))
        log(f"users page p99: {result['users_page']['p99_ms']} ms")
        alone = server.busy(consume_run(server.port, users, seconds, 0))
        loaded = server.busy(consume_run(server.port, users, seconds, PAGE_CLIENTS))
        paced = server.busy(consume_run(server.port, users, seconds, PAGE_CLIENTS, PACE))
        result["consume_alone"], result["consume_paged"] = alone, loaded
        result["consume_paced"] = paced
        result["consume_ratio"] = round(loaded["p99_ms"] / alone["p99_ms"], 2)
        result["consume_paced_ratio"] = round(paced["p99_ms"] / alone["p99_ms"], 2)
        log(f"consume alone {alone}; with {PAGE_CLIENTS} pagers {loaded}; paced {paced}")
    finally:
        server.stop()
    result["machine"] = machine()
    return result


def table(r: dict[str, Any]) -> str:
    pages = r["users_page"]["by_request"]
    lines = [
        "| measure | result | target |",
        "|---|---|---|",
        f"| users page p99, all {r['users_page']['requests']} requests | "
        f"{r['users_page']['p99_ms']} ms | ≤ 100 ms |",
    ]
    for name, row in pages.items():
        lines.append(f"| &nbsp; {name} (n={row['n']}) | p50 {row['p50_ms']} ms, "
                     f"p99 {row['p99_ms']} ms | |")  # fmt: skip
    a, b, c = r["consume_alone"], r["consume_paged"], r["consume_paced"]
    lines += [
        f"| consume p99 alone ({a['consumes']} consumes; server CPU "
        f"{a['server_cpu_percent']} %) | {a['p99_ms']} ms | |",
        f"| consume p99 while {PAGE_CLIENTS} clients page users continuously ({b['consumes']} "
        f"consumes, {b['pages']} pages; server CPU {b['server_cpu_percent']} %) | "
        f"{b['p99_ms']} ms ({r['consume_ratio']}×) | ≤ 1.2× |",
        f"| consume p99 while {PAGE_CLIENTS} clients page users every {PACE:g} s "
        f"({c['consumes']} consumes, {c['pages']} pages; server CPU "
        f"{c['server_cpu_percent']} %) | {c['p99_ms']} ms ({r['consume_paced_ratio']}×) | |",
        f"| start-up of run.py | {max(r['startup_s'])} s (runs: {r['startup_s']}) | ≤ 5 s |",
        f"| stats tick | p99 {r['stats_tick']['p99_ms']} ms "
        f"(p50 {r['stats_tick']['p50_ms']} ms) | ≤ 1 ms |",
        f"| database size | {r['db_mb_per_million_users']} MB per million users "
        f"({r['users']} users, {r['usage_rows']} usage rows) | |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--database-url", help="default: SQLite under bench/out/scale/")
    parser.add_argument("--rounds", type=int, default=20, help="users page rounds per sort")
    parser.add_argument("--seconds", type=float, default=10.0, help="per consume run")
    parser.add_argument("--fill-only", action="store_true")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    url = args.database_url or (
        f"sqlite:///{os.path.join(ROOT, 'bench', 'out', 'scale', f'users-{args.users}.db')}"
    )
    path = sqlite_path(url)
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    if args.fill_only:
        print(fill(url, args.users))
        return
    result = run(args.users, url, rounds=args.rounds, seconds=args.seconds)
    print(table(result))
    print(json.dumps(result["machine"]))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
