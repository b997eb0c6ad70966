"""Latencies the tests used to assert and now only check for correctness.

* ``revoke``: ``DELETE /api/admin/tokens/{id}`` until that token's WebSocket gets its 1008
  close and its SSE stream ends (the same path as a logout: ``QuotaApp.end_identity``);
* ``sigterm``: SIGTERM until a connected WebSocket gets 1012, and until the process exits;
* ``dashboard`` (with ``--dashboard``): a refused consume until the violation is in the
  feed of a live dashboard page in headless Chromium (Playwright, Debian /usr/bin/chromium).

Prints one JSON line per measurement with p50 and max in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request
from typing import Any

from common import TOKEN, machine, percentile, start_server
from tornado.httpclient import AsyncHTTPClient, HTTPRequest
from tornado.websocket import websocket_connect


async def api(url: str, method: str, path: str, body: Any = None, token: str = TOKEN) -> Any:
    request = HTTPRequest(
        url + path,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        body=json.dumps(body) if body is not None else (b"" if method == "POST" else None),
        allow_nonstandard_methods=True,
    )
    response = await AsyncHTTPClient().fetch(request, raise_error=False)
    return response.code, json.loads(response.body or b"null")


def api_sync(url: str, method: str, path: str, body: Any) -> int:
    """The same call without an event loop: Playwright's sync API owns this thread's loop."""
    request = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def open_streams(url: str, token: str) -> tuple[Any, asyncio.Future]:
    ws_url = url.replace("http://", "ws://") + "/ws/admin/quotas"
    ws = await websocket_connect(HTTPRequest(ws_url, headers={"Authorization": f"Bearer {token}"}))
    await ws.read_message()  # welcome
    welcomed = asyncio.get_running_loop().create_future()

    def chunk(data: bytes) -> None:
        if b"event: welcome" in data and not welcomed.done():
            welcomed.set_result(None)

    sse = asyncio.ensure_future(
        AsyncHTTPClient().fetch(
            HTTPRequest(
                url + "/sse/admin/quotas",
                headers={"Authorization": f"Bearer {token}"},
                streaming_callback=chunk,
                request_timeout=600,
            ),
            raise_error=False,
        )
    )
    await asyncio.wait_for(welcomed, 30)
    return ws, sse


async def until_closed(ws: Any) -> int | None:
    while await ws.read_message() is not None:
        pass
    return ws.close_code


async def revoke(rounds: int) -> dict[str, Any]:
    server = start_server()
    ws_ms, sse_ms = [], []
    try:
        for i in range(rounds):
            code, created = await api(
                server.url, "POST", "/api/admin/tokens", {"name": f"b{i}", "role": "viewer"}
            )
            assert code == 201, created
            ws, sse = await open_streams(server.url, created["token"])
            started = time.perf_counter()
            closed = asyncio.ensure_future(until_closed(ws))
            code, _ = await api(server.url, "DELETE", f"/api/admin/tokens/{created['token_id']}")
            assert code == 200
            assert await closed == 1008
            ws_ms.append((time.perf_counter() - started) * 1000)
            await sse
            sse_ms.append((time.perf_counter() - started) * 1000)
    finally:
        server.stop()
    return {
        "bench": "revoke",
        "rounds": rounds,
        "ws_close_p50_ms": round(percentile(ws_ms, 0.5), 1),
        "ws_close_max_ms": round(max(ws_ms), 1),
        "sse_end_p50_ms": round(percentile(sse_ms, 0.5), 1),
        "sse_end_max_ms": round(max(sse_ms), 1),
    }


async def sigterm(rounds: int) -> dict[str, Any]:
    close_ms, exit_ms = [], []
    for _ in range(rounds):
        server = start_server()
        try:
            ws, sse = await open_streams(server.url, TOKEN)
            started = time.perf_counter()
            closed = asyncio.ensure_future(until_closed(ws))
            server.proc.send_signal(signal.SIGTERM)
            assert await closed == 1012
            close_ms.append((time.perf_counter() - started) * 1000)
            await asyncio.get_running_loop().run_in_executor(None, server.proc.wait, 30)
            exit_ms.append((time.perf_counter() - started) * 1000)
            await sse
        finally:
            server.stop()
    return {
        "bench": "sigterm",
        "rounds": rounds,
        "ws_close_p50_ms": round(percentile(close_ms, 0.5), 1),
        "exit_p50_ms": round(percentile(exit_ms, 0.5), 1),
        "exit_max_ms": round(max(exit_ms), 1),
    }


def dashboard(rounds: int) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    server = start_server()
    shown_ms = []
    try:
        for i in range(rounds):
            path = f"/api/admin/quotas/users/bench-{i}/limits/shell"
            assert api_sync(server.url, "PUT", path, {"limits": {"daily": 0}}) == 200
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(f"{server.url}/login?token={TOKEN}")
            page.wait_for_selector("#conn[data-state=connected]", timeout=30_000)
            for i in range(rounds):
                user = f"bench-{i}"
                body = {"user": user, "command_type": "shell"}
                code = api_sync(server.url, "POST", "/api/quotas/consume", body)
                started = time.perf_counter()
                assert code == 429
                page.wait_for_function(
                    "u => [...document.querySelectorAll('#violations-feed .v-user')]"
                    ".some(n => n.textContent === u)",
                    arg=user,
                    polling="raf",
                    timeout=30_000,
                )
                shown_ms.append((time.perf_counter() - started) * 1000)
            browser.close()
    finally:
        server.stop()
    return {
        "bench": "dashboard",
        "rounds": rounds,
        "violation_shown_p50_ms": round(percentile(shown_ms, 0.5), 1),
        "violation_shown_max_ms": round(max(shown_ms), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--dashboard", action="store_true", help="also the browser latency")
    args = parser.parse_args()
    print(f"# machine: {machine()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    print(json.dumps(asyncio.run(revoke(args.rounds))), flush=True)
    print(json.dumps(asyncio.run(sigterm(max(1, args.rounds // 4)))), flush=True)
    if args.dashboard:
        print(json.dumps(dashboard(args.rounds)), flush=True)


if __name__ == "__main__":
    main()
