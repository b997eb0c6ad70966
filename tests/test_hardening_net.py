"""Issue 12, connection hygiene: one address cannot starve the others or flood the log.

The server is the real ``run.py`` in a subprocess whose open-files limit is lowered (as
``ulimit -n`` would), attacked with 1,100 half-finished requests from 127.0.0.1 while a
client on 127.0.0.2 (another loopback address) asks for ``/api/health``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import resource
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from clients import ADMIN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HALF_OPEN = 1100
BATCH = 100
PARTIAL = b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "  # never finished
LOG_BUDGET = 64 * 1024  # bytes of log for the whole attack (the pen test saw 148 MB)


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(every)


class Server:
    def __init__(self, tmp_path: Any, nofile: int, **server: Any):
        digest = hashlib.sha256(ADMIN.encode()).hexdigest()
        lines = ["server:", "  port: 0", "  log_level: info"]
        lines += [f"  {key}: {value}" for key, value in server.items()]
        lines += [
            "database:",
            f"  url: sqlite:///{tmp_path}/quotaserver.db",
            "  sqlite_synchronous: normal",
            "auth:",
            f"  token_file: {tmp_path}/admin_token",
            f"  tokens: [{{name: admin, role: admin, sha256: '{digest}'}}]",
            "plugins:",
            "  system_metrics: {enabled: false}",
        ]
        config = tmp_path / "server.yaml"
        config.write_text("\n".join(lines) + "\n")
        self.stdout = tmp_path / "stdout.log"
        self.stderr = tmp_path / "stderr.log"

        def lower_limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTASERVER_")}
        with open(self.stdout, "wb") as out, open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(ROOT, "run.py"), "--config", str(config)],
                cwd=str(tmp_path), env=env, stdout=out, stderr=err, preexec_fn=lower_limit,
            )  # fmt: skip
        found = wait_for(self._port, 30, "the server to listen")
        self.port = int(found)

    def _port(self) -> str | None:
        if self.proc.poll() is not None:
            raise AssertionError("server exited: " + self.stderr.read_text())
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.stdout.read_text())
        return match.group(1) if match else None

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def log_size(self) -> int:
        return os.path.getsize(self.stderr) + os.path.getsize(self.stdout)

    def health_from(self, source: str) -> bool:
        """One fresh request from ``source``: True if it was answered 200."""
        try:
            with socket.create_connection(
                ("127.0.0.1", self.port), timeout=5, source_address=(source, 0)
            ) as sock:
                sock.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                return sock.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.send_signal(2)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def server_factory(tmp_path: Any):
    servers: list[Server] = []

    def start(nofile: int, **server: Any) -> Server:
        servers.append(Server(tmp_path, nofile, **server))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def attacker_sockets():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < HALF_OPEN + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4 * HALF_OPEN), hard))
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def half_open(port: int, count: int, socks: list[socket.socket]) -> None:
    """``count`` connections from 127.0.0.1, each sending part of a request head.

    Opened in batches, each given up to a second to be established, so that they reach the
    server rather than overflowing the listen backlog.
    """
    for first in range(0, count, BATCH):
        batch = []
        for _ in range(min(BATCH, count - first)):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            batch.append(sock)
        socks.extend(batch)
        poller = select.poll()
        pending = {sock.fileno(): sock for sock in batch}
        for fd in pending:
            poller.register(fd, select.POLLOUT)
        deadline = time.monotonic() + 1.0
        while pending and time.monotonic() < deadline:
            for fd, _ in poller.poll(100):
                # Already closed by the server (over the cap): fine.
                with contextlib.suppress(OSError):
                    pending[fd].send(PARTIAL)
                poller.unregister(fd)
                del pending[fd]


def closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_half_open_connections_from_one_address_do_not_starve_others(
    server_factory, attacker_sockets
):
    server = server_factory(1024, header_timeout=3.0)
    baseline = server.open_fds()
    half_open(server.port, HALF_OPEN, attacker_sockets)
    # The other address is served while all 1,100 are (or try to be) open.
    assert wait_for(lambda: server.health_from("127.0.0.2"), 30, "health from 127.0.0.2")
    # One address holds at most server.max_connections_per_ip (100) descriptors.
    assert server.open_fds() <= baseline + 100 + 10, server.open_fds()
    # Half-finished heads are dropped after server.header_timeout, not after minutes.
    wait_for(lambda: server.open_fds() <= baseline + 2, 60, "the half-open ones to be dropped")
    dropped = sum(closed_by_server(s) for s in attacker_sockets)
    assert dropped >= 100, dropped
    assert server.health_from("127.0.0.1")  # and the attacking address is not banned
    size = server.log_size()
    assert size < LOG_BUDGET, f"{size} bytes of log"
    log = server.stderr.read_text()
    assert "server.max_connections_per_ip" in log  # said once, not 1,000 times
    assert log.count("max_connections_per_ip") <= 5
    assert "Traceback" not in log
    print(f"cap: {dropped} of {HALF_OPEN} half-open dropped by the server, log {size} bytes")


def test_accept_errors_at_the_fd_limit_are_logged_briefly_and_serving_resumes(
    server_factory, attacker_sockets
):
    # A cap above the fd limit: the process really runs out of descriptors.
    server = server_factory(256, header_timeout=2.0, max_connections_per_ip=100_000)
    half_open(server.port, HALF_OPEN, attacker_sockets)
    wait_for(lambda: "accept out of resources" in server.stderr.read_text(), 30, "EMFILE")
    # Descriptors come back as heads time out; a client of another address gets in.
    assert wait_for(lambda: server.health_from("127.0.0.2"), 90, "health after EMFILE", 0.5)
    size = server.log_size()
    assert size < LOG_BUDGET, f"{size} bytes of log"
    log = server.stderr.read_text()
    assert log.count("accept out of resources") <= 12, log[-2000:]
    assert "Traceback" not in log
    print(f"EMFILE: log {size} bytes, {log.count('accept out of resources')} accept-error lines")


def test_the_soft_open_files_limit_is_raised_at_start_up(server_factory):
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard < 2048:
        pytest.skip(f"the hard open-files limit here is {hard}")

    def lowered_soft() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))

    server = server_factory(1024)  # soft = hard = 1024: cannot be raised; warned
    assert "open-files limit is 1024" in server.stderr.read_text()
    proc = subprocess.Popen(
        [sys.executable, "-c", "from quotaserver.netguard import raise_open_files_limit as r;"
         "import resource; r(); print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=lowered_soft,
    )  # fmt: skip
    out, err = proc.communicate(timeout=30)
    assert int(out) == hard, err
