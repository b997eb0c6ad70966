"""Shared helpers for the benchmarks: a real server process and a lean WebSocket reader."""

from __future__ import annotations

import asyncio
import base64
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "bench-admin-token-0123456789abcdef"
SEQ = re.compile(rb'"seq":(\d+)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    workdir: tempfile.TemporaryDirectory

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc)
        self.workdir.cleanup()


def stop_process(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``grace`` seconds."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_server(**settings: str) -> Server:
    """Run run.py on a fresh SQLite file; ``settings`` are QUOTASERVER_* variables."""
    workdir = tempfile.TemporaryDirectory(prefix="qs-bench-")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTASERVER_")}
    env.update({"QUOTASERVER_ADMIN_TOKEN": TOKEN, "QUOTASERVER_SERVER_LOG_LEVEL": "warning"})
    env.update({f"QUOTASERVER_{k.upper()}": str(v) for k, v in settings.items()})
    log_path = os.path.join(workdir.name, "server.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "run.py"), "--port", str(port)],
            cwd=workdir.name,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.time() + 30
    while time.time() < deadline:
        with open(log_path) as fh:
            text = fh.read()
        if "listening on" in text:
            return Server(proc, port, workdir)
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{text}")


class HttpClient:
    """A keep-alive HTTP/1.1 client on one connection (lean, for load generation)."""

    def __init__(self, port: int, local_addr: tuple[str, int] | None = None):
        self.port = port
        self.local_addr = local_addr  # e.g. ("127.0.0.7", 0): spread clients over addresses

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", self.port, local_addr=self.local_addr
        )

    async def post(self, path: str, body: bytes, extra: str = "") -> tuple[int, bytes]:
        """``extra``: more header lines, each ending in CRLF."""
        self.writer.write(
            (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            ).encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


class LeanWebSocket:
    """Handshake, then read frames and note the arrival time of every ``seq``.

    Deliberately minimal (no JSON decode) so that a thousand of them in one process
    measure the server, not the client.
    """

    def __init__(self) -> None:
        self.arrivals: dict[int, float] = {}
        self.closed_code: int | None = None
        self.task: asyncio.Task | None = None

    async def connect(self, port: int, query: str = "") -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        path = "/ws/admin/quotas" + (f"?{query}" if query else "")
        writer.write(
            (
                f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
            ).encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(head.split(b"\r\n")[0].decode())
        self.reader, self.writer = reader, writer
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        reader = self.reader
        try:
            while True:
                b0, b1 = await reader.readexactly(2)
                length = b1 & 0x7F
                if length == 126:
                    length = int.from_bytes(await reader.readexactly(2), "big")
                elif length == 127:
                    length = int.from_bytes(await reader.readexactly(8), "big")
                payload = await reader.readexactly(length)
                opcode = b0 & 0x0F
                if opcode == 0x1:
                    match = SEQ.search(payload, 0, 80)
                    if match:
                        self.arrivals[int(match.group(1))] = time.perf_counter()
                elif opcode == 0x9:  # ping -> pong (client frames are masked)
                    self.writer.write(bytes([0x8A, 0x80 | length]) + b"\0\0\0\0" + payload)
                elif opcode == 0x8:
                    self.closed_code = int.from_bytes(payload[:2], "big") if payload else 1005
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return

    def close(self) -> None:
        if self.task:
            self.task.cancel()
        self.writer.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def machine() -> str:
    freq = psutil.cpu_freq()
    mhz = f", {freq.max or freq.current:.0f} MHz" if freq else ""
    return (
        f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores{mhz}, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )
