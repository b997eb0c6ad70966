"""Real PostgreSQL and Redis servers and quotaserver processes for tests (no mocks).

PostgreSQL comes from Debian's binaries (initdb and pg_ctl, run as the postgres user when
the tests run as root), Redis from ``redis-server``; `.ci/run` installs both. Each server
listens on a free loopback port and is stopped by the fixture that started it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import glob
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, NoReturn

import psutil
import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINDIRS = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
INITDB = next((os.path.join(d, "initdb") for d in BINDIRS if os.path.exists(f"{d}/initdb")), None)
REDIS = shutil.which("redis-server")
# `.ci/run` sets CI=true: there a missing server binary or browser fails the run.
CI = os.environ.get("CI", "").lower() == "true"


def missing(reason: str) -> NoReturn:
    """A binary the test needs is absent: skip locally, fail under ``CI=true``.

    A CI machine without PostgreSQL, Redis, nginx or Chromium must go red, not green with
    every test that needs them skipped.
    """
    if CI:
        pytest.fail(f"{reason} (CI=true: a missing binary fails the run)", pytrace=False)
    pytest.skip(reason)


def needs(present: bool, reason: str) -> pytest.MarkDecorator:
    """Mark tests that need a binary; ``conftest`` calls :func:`missing` when it is absent."""
    return pytest.mark.needs_binary(present=bool(present), reason=reason)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(args: list[str]) -> list[str]:
    # initdb and postgres refuse to run as root.
    return ["runuser", "-u", "postgres", "--", *args] if os.geteuid() == 0 else args


def _template_cluster() -> str:
    """The data directory of an empty cluster made once by initdb for this machine's
    server binaries (under a lock: parallel test processes make it once), to be copied."""
    stamp = f"{os.getuid()}-{int(os.stat(INITDB).st_mtime)}-1"
    base = os.path.join(tempfile.gettempdir(), f"qs-pg-template-{stamp}")
    data, ready = os.path.join(base, "data"), os.path.join(base, "ready")
    if os.path.exists(ready):
        return data
    os.makedirs(base, exist_ok=True)
    with open(f"{base}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.exists(ready):
            shutil.rmtree(data, ignore_errors=True)
            if os.geteuid() == 0:
                shutil.chown(base, "postgres", "postgres")
            command = [INITDB, "-D", data, "-A", "trust", "-U", "postgres", "--wal-segsize=1"]
            subprocess.run(_as_postgres(command), check=True, capture_output=True)
            open(ready, "w").close()
    return data


class Postgres:
    """A throwaway PostgreSQL cluster: ``start``, ``stop`` (kept data), ``create_database``."""

    def __init__(self) -> None:
        assert INITDB is not None, "PostgreSQL server binaries not installed"
        self.bindir = os.path.dirname(INITDB)
        self.workdir = tempfile.mkdtemp(prefix="qs-pg-")
        self.data = os.path.join(self.workdir, "data")
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
        self.port = free_port()
        self._names = itertools.count(1)
        # A copy of one initdb made per machine: initdb takes seconds, a copy a few ms.
        subprocess.run(["cp", "-a", _template_cluster(), self.data], check=True)

    def _run(self, args: list[str]) -> None:
        subprocess.run(_as_postgres(args), check=True, capture_output=True)

    def start(self) -> None:
        self._run(
            [
                f"{self.bindir}/pg_ctl", "-D", self.data, "-w", "-l",
                os.path.join(self.workdir, "log"),
                "-o", f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 "
                "-c fsync=off -c max_connections=200",
                "start",
            ]
        )  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run([f"{self.bindir}/pg_ctl", "-D", self.data, "-m", mode, "-w", "stop"])

    def pause(self, sig: int = signal.SIGSTOP) -> None:
        """SIGSTOP the server and every backend: connections stay open and nothing answers
        (a hung server, unlike a stopped one that refuses connections). ``SIGCONT`` resumes."""
        with open(os.path.join(self.data, "postmaster.pid"), encoding="ascii") as fh:
            postmaster = psutil.Process(int(fh.readline()))
        for process in [postmaster, *postmaster.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(sig)

    def resume(self) -> None:
        self.pause(signal.SIGCONT)

    def create_database(self) -> str:
        """A new, empty database; returns its URL."""
        name = f"qs{next(self._names)}"
        self._run(
            [f"{self.bindir}/createdb", "-h", "127.0.0.1", "-p", str(self.port),
             "-U", "postgres", name]
        )  # fmt: skip
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):  # already stopped
            self.stop("immediate")
        shutil.rmtree(self.workdir, ignore_errors=True)


class Redis:
    """A redis-server on a fixed free port, so it can be killed and started again."""

    def __init__(self, password: str | None = None) -> None:
        assert REDIS is not None, "redis-server not installed"
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "no",
             *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class Server:
    """One quotaserver process (``run.py``) with a YAML config; ``url`` once it listens."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str, output: list[str]):
        self.proc = proc
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])
        self.output = output  # every line it printed (stdout and stderr), kept as it runs
        self._drained = asyncio.ensure_future(_drain(proc, output))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send_signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 20) -> int:
        """The exit status, once the process has exited and all it printed is in ``output``."""
        status = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._drained, timeout)
        return status

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the server and every worker it forked (its process group)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def make_certificate(directory: Any) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1 (one day), made with ``openssl``: the
    (certificate, key) paths."""
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", key, "-out", cert,
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def write_config(path: str, settings: dict[str, Any]) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(settings, fh)
    return path


async def start_server(
    cwd: str, config: dict[str, Any], *args: str, env: dict[str, str] | None = None
) -> Server:
    """Start ``run.py`` with ``config`` (a YAML mapping) in ``cwd`` on a free port."""
    path = write_config(os.path.join(cwd, f"config-{free_port()}.yaml"), config)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTASERVER_")}
    full_env.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, os.path.join(ROOT, "run.py"), "--config", path, "--port", "0", *args,
        cwd=cwd, env=full_env, start_new_session=True,  # its own group: workers included
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    lines: list[str] = []
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        assert line, "server exited before listening:\n" + "".join(lines)
        lines.append(line)
        if "listening on" in line:
            break
    return Server(proc, re.search(r"http://[0-9.:]+", line).group(0), lines)


async def _drain(proc: asyncio.subprocess.Process, lines: list[str]) -> None:
    while True:
        line = await proc.stdout.readline()
        if not line:
            return
        lines.append(line.decode(errors="replace"))
