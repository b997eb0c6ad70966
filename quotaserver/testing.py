"""A pytest plugin for plugin authors: the real server, with your plugin, in a subprocess.

Installed with quotaserver (entry point ``pytest11``), so in a plugin's own tests::

    def test_my_field(quotaserver_server):
        server = quotaserver_server(plugins={"my_plugin": {"interval": 0.1}})
        assert "my_plugin" in server.plugin_names()
        with server.stream() as stream:
            stats = stream.wait_for_stats(lambda s: "my_field" in s)

The server is ``python -m quotaserver serve`` on a free port with a temporary SQLite
database, the installed plugins (yours included, once ``pip install -e .`` ran) and an admin
token. :meth:`QuotaServer.stream` opens the WebSocket and merges stats deltas into one
current snapshot, as the dashboard does. Tests stay synchronous: no async plugin needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

__all__ = ["QuotaServer", "ServerDidNotStart", "StatsStream", "quotaserver_server"]

START_TIMEOUT = 30.0


class ServerDidNotStart(RuntimeError):
    """The server exited (or never listened) instead of starting: a refused configuration
    exits with ``status`` 2 and says why in ``output``."""

    def __init__(self, status: int | None, output: str):
        super().__init__(f"quotaserver did not start (exit status {status}):\n{output}")
        self.status = status
        self.output = output


class QuotaServer:
    """A running server process: HTTP helpers, a stream client, ``stop``."""

    def __init__(self, process: subprocess.Popen, url: str, token: str, output: list[str]):
        self.process = process
        self.url = url
        self.token = token
        self.output = output  # everything the server printed (stdout and stderr)

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One JSON request as admin; ``(status, parsed body)``; never raises for 4xx/5xx."""
        data = json.dumps(body).encode() if body is not None else None
        if data is None and method in ("POST", "PUT", "PATCH"):
            data = b""
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def get(self, path: str) -> Any:
        status, body = self.request("GET", path)
        assert status == 200, f"GET {path}: {status} {body}"
        return body

    def consume(self, user: str, command_type: str = "shell", count: int = 1) -> tuple[int, Any]:
        body = {"user": user, "command_type": command_type, "count": count}
        return self.request("POST", "/api/quotas/consume", body)

    def plugin_names(self) -> set[str]:
        return {p["name"] for p in self.get("/api/plugins")["plugins"]}

    def health(self) -> dict[str, Any]:
        return self.get("/api/ws/health")

    def stream(self, types: str | None = None) -> StatsStream:
        """A WebSocket client (``types``: the ``?types=`` filter) that merges stats."""
        return StatsStream(self, types)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then the exit status (killed if it does not stop within ``timeout``)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class StatsStream:
    """A live WebSocket client on its own thread and event loop.

    ``stats`` is the current snapshot: the full one sent after ``welcome``, with every later
    delta merged in. ``events`` holds every other message, in order.
    """

    def __init__(self, server: QuotaServer, types: str | None = None):
        self.stats: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        query = f"?types={types}" if types else ""
        url = server.url.replace("http://", "ws://") + "/ws/admin/quotas" + query
        self._conn = asyncio.run_coroutine_threadsafe(
            self._connect(url, server.token), self._loop
        ).result(START_TIMEOUT)
        self._reader = asyncio.run_coroutine_threadsafe(self._read(), self._loop)

    async def _connect(self, url: str, token: str) -> Any:
        from tornado.httpclient import HTTPRequest
        from tornado.websocket import websocket_connect

        request = HTTPRequest(url, headers={"Authorization": f"Bearer {token}"})
        return await websocket_connect(request)

    async def _read(self) -> None:
        while (raw := await self._conn.read_message()) is not None:
            message = json.loads(raw)
            with self._changed:
                if message["type"] == "stats":
                    data = {k: v for k, v in message["data"].items() if k != "delta"}
                    if not message["data"].get("delta"):
                        self.stats = {}
                    self.stats.update(data)
                else:
                    self.events.append(message)
                self._changed.notify_all()

    def wait_for(self, condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
        """Wait until ``condition()`` is truthy and return it; fail with a message if not."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not (result := condition()):
                left = deadline - time.monotonic()
                if left <= 0 or self._reader.done():
                    raise AssertionError(f"not seen within {timeout} s: {what or condition}")
                self._changed.wait(left)
        return result

    def wait_for_stats(self, condition: Callable[[dict], Any], timeout: float = 10.0) -> dict:
        """The merged snapshot once ``condition(snapshot)`` holds."""
        self.wait_for(lambda: condition(self.stats), timeout, "stats condition")
        return dict(self.stats)

    def wait_for_event(
        self, type: str, condition: Callable[[dict], Any] = bool, timeout: float = 10.0
    ) -> dict:
        """The first message of ``type`` whose envelope satisfies ``condition``."""

        def find() -> dict | None:
            return next((e for e in self.events if e["type"] == type and condition(e)), None)

        return self.wait_for(find, timeout, f"a {type} message")

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._conn.close)
        with contextlib.suppress(Exception):  # closing: a reset connection is fine
            self._reader.result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():  # the resolver's thread too: nothing left behind
            self._loop.run_until_complete(self._loop.shutdown_default_executor())
            self._loop.close()

    def __enter__(self) -> StatsStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _installed_plugins(directory: Path, config: dict[str, Any]) -> list[str]:
    """The names of the plugins that would load with ``config`` (``quotaserver plugins``)."""
    path = directory / "plugins-probe.yaml"
    path.write_text(yaml.safe_dump(config))
    listed = subprocess.run(
        [sys.executable, "-m", "quotaserver", "plugins", "--json", "--config", str(path)],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT,
    )
    if listed.returncode != 0:
        raise ServerDidNotStart(listed.returncode, listed.stdout + listed.stderr)
    return [p["name"] for p in json.loads(listed.stdout)["plugins"]]


def start_server(
    directory: Path,
    plugins: dict[str, Any] | None = None,
    only: list[str] | None = None,
    **settings: Any,
) -> QuotaServer:
    """Start ``python -m quotaserver serve`` with a config in ``directory``.

    ``settings`` are nested YAML sections (``realtime={"stats_interval": 0.1}``); stats are
    sent every 0.2 s and the host's CPU load does not throttle unless you say otherwise.
    ``only=["my_plugin"]`` disables every other plugin (the built-in ones included).
    """
    token = secrets.token_urlsafe(24)
    config = _merge(
        {
            "database": {"url": f"sqlite:///{directory}/quotaserver.db"},
            "server": {"host": "127.0.0.1", "port": _free_port()},
            "auth": {"token_file": f"{directory}/admin_token"},
            "realtime": {"stats_interval": 0.2},
            "throttle": {"cpu_bands": [[100, 1.0]], "memory_bands": [[100, 1.0]]},
            "plugins": plugins or {},
        },
        settings,
    )
    if only is not None:
        off = {"enabled": False}
        others = [n for n in _installed_plugins(directory, config) if n not in only]
        config["plugins"] = {**config["plugins"], **{n: off for n in others}}
    path = directory / "quotaserver.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTASERVER_")}
    env["QUOTASERVER_ADMIN_TOKEN"] = token
    process = subprocess.Popen(
        [sys.executable, "-m", "quotaserver", "serve", "--config", str(path)],
        cwd=directory,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    found = threading.Event()

    def pump() -> None:  # keeps the pipe drained for the life of the process
        for line in process.stdout:
            output.append(line)
            if "listening on" in line:
                found.set()
        found.set()

    pumping = threading.Thread(target=pump, daemon=True)
    pumping.start()
    found.wait(START_TIMEOUT)
    listening = [line for line in output if "listening on" in line]
    if not listening:  # it exited (its output ended) or it is still not listening
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)
        if process.poll() is None:
            process.kill()
            process.wait()
        pumping.join(5)
        raise ServerDidNotStart(process.returncode, "".join(output))
    url = re.search(r"http://\S+", listening[0]).group(0)
    return QuotaServer(process, url, token, output)


@pytest.fixture
def quotaserver_server(tmp_path: Path) -> Iterator[Callable[..., QuotaServer]]:
    """``server = quotaserver_server(plugins={...}, only=[...], **sections)``: the real
    server, stopped after the test."""
    servers: list[QuotaServer] = []

    def start(
        plugins: dict[str, Any] | None = None, only: list[str] | None = None, **settings: Any
    ) -> QuotaServer:
        directory = tmp_path / f"server{len(servers)}"
        directory.mkdir()
        server = start_server(directory, plugins, only, **settings)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
