"""Support for the browser tests: the real server as a subprocess, HTTP as integrators
use it, the Chromium launch settings.

The server runs as ``run.py`` in its own process (Playwright's sync API cannot share the
test's event loop, and a real process can be stopped and restarted on the same port and
database file).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

import yaml
from services import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
ADMIN = "browser-admin-token-0123456789abcdef"
VIEWER = "browser-viewer-token-0123456789abcdef"
SERVICE = "browser-service-token-0123456789abcdef"
API = "/api/admin/quotas"
WAIT = 30_000  # ms: generous, the machine is shared (the 500 ms check is separate)


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Server:
    """``run.py`` on a fixed port and SQLite file; ``stop()`` and ``start()`` again."""

    def __init__(self, directory: str, demo: bool = False, **settings: Any):
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db_path = os.path.join(directory, "quotaserver.db")
        config = {
            "demo": demo,
            "server": {"host": "127.0.0.1", "port": self.port, "log_level": "warning"},
            "database": {"url": f"sqlite:///{self.db_path}", "sqlite_synchronous": "normal"},
            # Never throttle: the shared test machine's CPU must not refuse consumes.
            "throttle": {"cpu_bands": [[100, 1.0]], "memory_bands": [[100, 1.0]]},
            "realtime": {"stats_interval": 1.0, "heartbeat_interval": 5.0},
            "auth": {
                "tokens": [
                    {"name": "browser-admin", "role": "admin", "sha256": _sha(ADMIN)},
                    {"name": "browser-viewer", "role": "viewer", "sha256": _sha(VIEWER)},
                    {"name": "browser-service", "role": "service", "sha256": _sha(SERVICE)},
                ],
                "token_file": os.path.join(directory, "admin_token"),
            },
            "plugins": {"system_metrics": {"interval": 1.0}},
        }
        for key, value in settings.items():  # section__name=value, or a top-level key
            section, _, name = key.partition("__")
            if name:
                config.setdefault(section, {})[name] = value
            else:
                config[section] = value
        self.config_path = os.path.join(directory, "quotaserver.yaml")
        with open(self.config_path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(config, fh)
        self.process: subprocess.Popen | None = None
        self.log: list[str] = []

    def start(self, timeout: float = 30.0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "run.py"), "--config", self.config_path],
            cwd=self.directory,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        ready = threading.Event()

        def read(stream: Any) -> None:
            for line in stream:
                self.log.append(line.rstrip())
                if "listening on" in line:
                    ready.set()

        threading.Thread(target=read, args=(self.process.stdout,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start:\n" + "\n".join(self.log[-30:]))

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    # -- HTTP as an integrator sees it ----------------------------------------------------
    def call(self, method: str, path: str, body: Any = None, token: str = ADMIN) -> Any:
        """One JSON request; returns ``(status, parsed body)``."""
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.url + path,
            data=data if data is not None else (b"" if method in ("POST", "PUT") else None),
            method=method,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def consume(self, user: str, command_type: str = "shell", count: int = 1) -> int:
        body = {"user": user, "command_type": command_type, "count": count}
        return self.call("POST", "/api/quotas/consume", body, token=SERVICE)[0]

    def set_user_limit(self, user: str, daily: int, command_type: str = "shell") -> None:
        path = f"{API}/users/{quote(user, safe='')}/limits/{command_type}"
        status, body = self.call("PUT", path, {"limits": {"daily": daily}})
        assert status == 200, body

    def wait_for_open_alert(self, user: str, timeout: float = 30.0) -> dict:
        """The open alert about ``user``; the alert engine raises it after the response."""
        deadline = time.monotonic() + timeout
        while True:
            status, body = self.call("GET", f"{API}/alerts?status=open&per_page=100")
            assert status == 200, body
            found = [a for a in body["items"] if a["username"] == user]
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"no open alert about {user} after {timeout} s")
            time.sleep(0.05)


# A third-party plugin for the dashboard's plugin figures and events: a queue-depth stats
# field and a queue_alarm event on every violation, whose message is MESSAGE (a Python
# expression over ``violation``).
QUEUE_PLUGIN = """
from quotaserver import PeriodicEmitter, hookimpl


@hookimpl
def register_event_types():
    return ["queue_alarm"]


@hookimpl
def register_emitters(app):
    figures = {"depth": 7, "oldest_seconds": 3.5, "spool_bytes": 3 * 1024 * 1024}
    return [PeriodicEmitter("queue", 0.2, lambda: figures, stats_field="queue")]


@hookimpl
async def on_violation(app, violation):
    await app.publish_event("queue_alarm", {"message": MESSAGE})
"""


def write_queue_plugin(directory: str, message: str) -> str:
    """The queue plugin in ``directory``/plugins (created); returns that plugins_dir."""
    plugins = os.path.join(directory, "plugins")
    os.makedirs(plugins, exist_ok=True)
    with open(os.path.join(plugins, "queue.py"), "w", encoding="utf-8") as fh:
        fh.write(QUEUE_PLUGIN.replace("MESSAGE", message))
    return plugins
