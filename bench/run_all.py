"""`make bench`: the side-by-side benchmark at a small size; ``--full`` for the whole table.

Writes ``results.json``, ``table.md`` and ``fanout-p99.png`` (p99 against N for every
broadcaster) to ``--out``, and prints the table. docs/benchmarks.md records a full run and
the method. Benchmarks report numbers; they do not pass or fail.

    python bench/run_all.py                    # small: 100 and 500 clients, 3 s consume
    python bench/run_all.py --full             # 100, 1k, 5k, 10k clients, 10 s consume
    python bench/run_all.py --full --workers 2 # adds consume rows with run.py --workers 2
    #                                            (and a redis-server backplane it starts)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import sidebyside as sbs
from common import machine

HERE = os.path.dirname(os.path.abspath(__file__))

SMALL = {"sizes": [100, 500], "events": {100: 20, 500: 10}, "seconds": 3.0}
FULL = {"sizes": [100, 1000, 5000, 10000], "events": sbs.EVENTS, "seconds": 10.0}


def run(
    spec: dict,
    workers: list[int],
    server_cpus: str,
    servers: tuple[str, ...] = sbs.SERVERS,
    consume_connections: tuple[int, ...] = (1, 32),
    save: Callable[[dict], None] | None = None,
    fanout_workers: bool = False,
) -> dict:
    """Every fan-out and consume run of ``spec``; ``workers`` lists quotaserver's modes
    (for consume; for fan-out too with ``fanout_workers``).

    ``save`` gets the results so far after every run (a crash keeps what was measured).
    """
    fanout: list[dict] = []
    consume: list[dict] = []
    results = {"machine": machine(), "fanout": fanout, "consume": consume}
    for name in servers:
        for count in workers if name == "quotaserver" and fanout_workers else [1]:
            for transport in sbs.TRANSPORTS[name]:
                fanout += asyncio.run(
                    sbs.fanout(name, transport, spec["sizes"], spec["events"], server_cpus, count)
                )
                if save:
                    save(results)
    for name in ("quotaserver", "tornado"):
        if name not in servers:
            continue
        for count in workers if name == "quotaserver" else [1]:
            for connections in consume_connections:
                consume.append(
                    asyncio.run(sbs.consume(name, connections, spec["seconds"], server_cpus, count))
                )
                if save:
                    save(results)
    if "quotaserver" in servers:
        # Batches of 100 beside the single consumes of the same build (issue 23's 10x).
        consume.append(
            asyncio.run(sbs.consume("quotaserver", 8, spec["seconds"], server_cpus, 1, batch=BATCH))
        )
        if save:
            save(results)
    return results


BATCH = 100  # decisions per batch request in the batch row


def table(results: dict) -> str:
    lines = [f"Machine: {results['machine']}"]
    if "load_average" in results:
        before, after = results["load_average"]
        lines.append(
            f"Run: {results['minutes']} min, generator loop {results['loop']}, "
            f"1-minute load average {before} before, {after} after"
        )
    lines.append("")
    for transport, title in (("ws", "WebSocket"), ("sse", "SSE")):
        rows = [r for r in results["fanout"] if r["transport"] == transport]
        if not rows:
            continue
        servers = list(dict.fromkeys(r["server"] for r in rows))
        lines += [
            f"Fan-out over {title}: latency p50 / p99 / last client (ms)",
            "",
            "| clients | " + " | ".join(servers) + " |",
            "| ---: |" + " ---: |" * len(servers),
        ]
        for size in sorted({r["clients"] for r in rows}):
            cells = []
            for server in servers:
                hit = [r for r in rows if r["server"] == server and r["clients"] == size]
                r = hit[0] if hit else None
                cells.append(
                    f"{r['p50_ms']} / {r['p99_ms']} / {r['last_ms']}"
                    + ("" if r["delivered"] == r["expected"] else " (lost)")
                    if r
                    else "-"
                )
            lines.append(f"| {size:,} | " + " | ".join(cells) + " |")
        lines.append("")
    top = max((r["clients"] for r in results["fanout"]), default=0)
    lines += [
        f"Memory at {top:,} clients, and CPU per event",
        "",
        "| server | transport | RSS KiB per connection | server CPU ms / event | "
        "generator CPU ms / event | seconds to connect the last step |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results["fanout"]:
        if r["clients"] == top:
            lines.append(
                f"| {r['server']} | {r['transport']} | {r['rss_kib_per_conn']} | "
                f"{r['server_cpu_ms_per_event']} | {r['client_cpu_ms_per_event']} | "
                f"{r.get('connect_s', '-')} |"
            )
    lines += [
        "",
        "Consume (quotaserver: synchronous=full; tornado: bare JSON POST handler)",
        "",
        "| server | connections | requests/s | decisions/s | p50 ms | p99 ms | statuses | "
        "server CPU ms / decision |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in results["consume"]:
        statuses = ", ".join(f"{k}: {v}" for k, v in r["status_counts"].items())
        label = f"{r['server']}, batch of {r['batch']}" if r.get("batch") else r["server"]
        decisions = r.get("decisions_per_s", r["requests_per_s"])
        cpu = r.get("server_cpu_ms_per_decision", r["server_cpu_ms_per_request"])
        lines.append(
            f"| {label} | {r['connections']} | {r['requests_per_s']:,.0f} | {decisions:,.0f} | "
            f"{r['p50_ms']} | {r['p99_ms']} | {statuses} | {cpu} |"
        )
    lines += ratios(results["consume"])
    return "\n".join(lines) + "\n"


def ratios(consume: list[dict]) -> list[str]:
    """The consume ratios the targets are stated in, from rows of this run: the single
    consumes with the most connections, against the bare handler and against batches."""
    singles = [r for r in consume if not r.get("batch")]
    most = max((r["connections"] for r in singles), default=0)

    def row(server: str) -> dict | None:
        return next((r for r in singles if (r["server"], r["connections"]) == (server, most)), None)

    single, bare = row("quotaserver"), row("tornado")
    batched = next((r for r in consume if r.get("batch")), None)
    out = [""]
    if single and bare:
        ratio = single["requests_per_s"] / bare["requests_per_s"]
        out.append(f"single consume vs bare handler, {most} connections: {ratio:.2f}x")
    if single and batched:
        ratio = batched["decisions_per_s"] / single["requests_per_s"]
        out.append(f"batch of {batched['batch']}: decisions/s vs single consumes/s: {ratio:.1f}x")
    return out


def plot(results: dict, path: str) -> bool:
    """p99 against N, one line per broadcaster and transport; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = dict.fromkeys((r["server"], r["transport"]) for r in results["fanout"])
    for server, transport in series:
        rows = sorted(
            (r for r in results["fanout"] if (r["server"], r["transport"]) == (server, transport)),
            key=lambda r: r["clients"],
        )
        ax.plot(
            [r["clients"] for r in rows],
            [r["p99_ms"] for r in rows],
            marker="o",
            linestyle="-" if transport == "ws" else "--",
            label=f"{server} ({'WebSocket' if transport == 'ws' else 'SSE'})",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("clients (N)")
    ax.set_ylabel("fan-out latency p99 (ms)")
    ax.set_title("One event to N clients: p99 latency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="N up to 10k, 10 s consume runs")
    parser.add_argument(
        "--workers", type=int, default=1, help="also run quotaserver with run.py --workers N"
    )
    parser.add_argument(
        "--fanout-workers", action="store_true", help="--workers rows for fan-out too"
    )
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--client-cpus", default="1")
    parser.add_argument("--out", default=os.path.join(HERE, "out"))
    args = parser.parse_args()
    sbs.raise_fd_limit()
    sbs.pin(args.client_cpus)
    loop = sbs.use_uvloop()
    os.makedirs(args.out, exist_ok=True)
    workers = [1] if args.workers == 1 else [1, args.workers]
    load_before = os.getloadavg()
    started = time.time()

    def save(partial: dict) -> None:
        with open(os.path.join(args.out, "partial.json"), "w") as fh:
            json.dump(partial, fh, indent=1)

    spec = FULL if args.full else SMALL
    results = run(spec, workers, args.server_cpus, save=save, fanout_workers=args.fanout_workers)
    results["loop"] = loop
    results["minutes"] = round((time.time() - started) / 60, 1)
    # Other work on the machine shows here: 1-minute load average before and after.
    results["load_average"] = [round(load_before[0], 2), round(os.getloadavg()[0], 2)]
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    text = table(results)
    with open(os.path.join(args.out, "table.md"), "w") as fh:
        fh.write(text)
    print(text)
    if plot(results, os.path.join(args.out, "fanout-p99.png")):
        print(f"plot: {os.path.join(args.out, 'fanout-p99.png')}")
    # Several instances on PostgreSQL + Redis: latency across instances, 1 vs 2 workers.
    cluster = [sys.executable, os.path.join(HERE, "cluster.py")]
    return subprocess.run(cluster if args.full else [*cluster, "--quick"]).returncode


if __name__ == "__main__":
    sys.exit(main())
