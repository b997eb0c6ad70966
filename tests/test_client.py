"""quotaserver.client against a real server process, through a real TCP proxy that can lose
an answer (the case the Idempotency-Key exists for)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading

import pytest
from clients import ADMIN, SERVICE, call
from conftest import TOKENS
from services import start_server
from waits import wait_until

from quotaserver.client import (
    AsyncQuotaClient,
    QuotaClient,
    QuotaRequestError,
    QuotaUnavailable,
    RetryPolicy,
)

ENV = {
    "QUOTASERVER_ADMIN_TOKEN": ADMIN,
    "QUOTASERVER_THROTTLE_SOURCE": "off",
    "QUOTASERVER_SERVER_LOG_LEVEL": "warning",
}


async def start(cwd):
    config = {
        "auth": {"tokens": TOKENS, "token_file": str(cwd / "admin_token")},
        "quotas": {"defaults": {"shell": {"daily": 3}, "code": {"daily": 100}}},
    }
    return await start_server(str(cwd), config, env=ENV)


class LossyProxy:
    """Forwards TCP to ``upstream``; ``lose_next`` drops the next answer after the server
    sent it (the request was handled, the client never hears), and ``down`` refuses."""

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.lose_next = False
        self.lost = asyncio.Event()
        self.down = False
        self.connections = 0
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader, writer) -> None:
        self.connections += 1
        try:
            if self.down:
                raise ConnectionRefusedError
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()  # the client sees the connection closed without an answer
            return
        try:
            up_writer.write(await _request(reader))
            await up_writer.drain()
            answer = await up_reader.read(65536)
            if self.lose_next:
                self.lose_next, self.down = False, True  # and refuse until told otherwise
                self.lost.set()
                return
            writer.write(answer)
            await writer.drain()
        finally:
            up_writer.close()
            writer.close()

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def _request(reader) -> bytes:
    """One HTTP request with a Content-Length body (what the clients send)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


@pytest.mark.gen_test(timeout=60)
async def test_the_blocking_client_allowed_denied_with_retry_after_and_refund(tmp_path):
    server = await start(tmp_path)
    try:
        client = QuotaClient(server.url, token=SERVICE)
        first = client.consume("alice", "shell", 2)
        assert first.allowed and not first.replayed and first.key
        assert first.periods["daily"].remaining == 1 and first.throttle_factor == 1.0
        assert client.check("alice", "shell").allowed
        denied = client.consume("alice", "shell", 2)  # a 429 is a result
        assert not denied.allowed and denied.reason == "quota_exceeded"
        assert denied.retry_after is not None and denied.retry_after >= 1
        again = client.consume("alice", "shell", 2, key=first.key)  # the caller's own retry
        assert again.replayed and again.body == first.body
        refund = client.refund("alice", "shell", first.key)
        assert refund.count == 2 and refund.refunded_periods == ["daily", "weekly", "monthly"]
        assert refund.periods["daily"].used == 0
        assert client.refund("alice", "shell", first.key).replayed
        with pytest.raises(QuotaRequestError) as bad:
            client.consume("alice", "nope")
        assert bad.value.status == 400 and bad.value.code == "unknown_command_type"
        with pytest.raises(QuotaRequestError) as unknown:
            client.refund("alice", "shell", "never-used")
        assert unknown.value.status == 404
    finally:
        server.kill()
        await server.wait()


@pytest.mark.gen_test(timeout=120)
async def test_a_lost_answer_is_retried_through_a_server_restart_and_counts_once(tmp_path):
    server = await start(tmp_path)
    proxy = LossyProxy(server.port)
    url = await proxy.start()
    try:
        client = AsyncQuotaClient(url, token=SERVICE, retry=RetryPolicy(deadline=60))
        proxy.lose_next = True
        pending = asyncio.ensure_future(client.consume("bob", "code", 5))
        await asyncio.wait_for(proxy.lost.wait(), 20)  # counted, and the answer is gone
        server.send_signal(signal.SIGKILL)
        await server.wait()
        server = await start(tmp_path)  # the same SQLite file, a new port
        proxy.upstream, proxy.down = server.port, False
        result = await asyncio.wait_for(pending, 60)
        assert result.allowed and result.replayed
        assert result.periods["daily"].used == 5
        status = await call(server, "GET", "/api/quotas/users/bob", token=SERVICE)
        assert status.json["command_types"]["code"]["daily"]["used"] == 5
    finally:
        await proxy.stop()
        server.kill()
        with contextlib.suppress(Exception):
            await server.wait()


@pytest.mark.gen_test(timeout=60)
async def test_the_deadline_bounds_the_retries(tmp_path):
    proxy = LossyProxy(upstream=1)  # nothing listens there: every attempt is refused
    proxy.down = True
    url = await proxy.start()
    try:
        client = AsyncQuotaClient(url, retry=RetryPolicy(deadline=1.0, base_delay=0.05))
        with pytest.raises(QuotaUnavailable) as gave_up:
            await client.consume("carol", "shell")
        assert gave_up.value.attempts > 1 and proxy.connections == gave_up.value.attempts
    finally:
        await proxy.stop()


@pytest.mark.gen_test(timeout=60)
async def test_the_blocking_client_retries_a_lost_answer_and_counts_once(tmp_path):
    server = await start(tmp_path)
    proxy = LossyProxy(server.port)
    url = await proxy.start()
    outcome: list = []
    try:
        proxy.lose_next = True
        client = QuotaClient(url, token=SERVICE, retry=RetryPolicy(deadline=30))
        # Its own thread: the proxy runs on this loop, which a blocking call would stop.
        thread = threading.Thread(target=lambda: outcome.append(client.consume("dan", "code", 4)))
        thread.start()
        await asyncio.wait_for(proxy.lost.wait(), 20)
        proxy.down = False  # the server never went away: only the answer was lost
        await wait_until(lambda: not thread.is_alive(), "the client's retries to finish")
        thread.join()
        (result,) = outcome
        assert result.allowed and result.replayed and result.periods["daily"].used == 4
        status = await call(server, "GET", "/api/quotas/users/dan", token=SERVICE)
        assert status.json["command_types"]["code"]["daily"]["used"] == 4
    finally:
        await proxy.stop()
        server.kill()
        await server.wait()
