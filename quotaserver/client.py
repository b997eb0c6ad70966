"""A Python client for the quota API: ``QuotaClient`` (blocking) and ``AsyncQuotaClient``.

Every integrator needs the same three things, so they live here once:

- **Exactly once under retries.** Each :meth:`~QuotaClient.consume` call draws one
  ``Idempotency-Key`` and sends it with every attempt: a retry after a lost answer gets the
  first answer back (``replayed``) and counts nothing.
- **Retries with backoff and jitter, bounded by a deadline.** Connection errors, timeouts,
  ``503`` and ``409`` (the same key still in flight) are retried after a full-jitter
  exponential delay (never shorter than the server's ``Retry-After``) until ``deadline``
  seconds have passed since the call began; then :class:`QuotaUnavailable`.
- **A 429 is a result, not an exception**: ``allowed`` is False and ``retry_after`` says
  when the refusing window resets. Other 4xx raise :class:`QuotaRequestError` (a bug in
  the request: retrying cannot help).

Only the standard library (blocking) and Tornado (async, already a dependency) are used::

    from quotaserver.client import QuotaClient

    client = QuotaClient("http://127.0.0.1:8080", token="...")
    result = client.consume("alice", "shell")
    if result.allowed:
        run_the_command()
    else:
        print(f"over quota, try again in {result.retry_after:.0f} s")
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from tornado.iostream import StreamClosedError

__all__ = [
    "AsyncQuotaClient",
    "Period",
    "QuotaClient",
    "QuotaClientError",
    "QuotaRequestError",
    "QuotaResult",
    "QuotaUnavailable",
    "RefundResult",
    "RetryPolicy",
]

#: Statuses worth another attempt: the answer may come (or come back) later.
RETRY_STATUSES = frozenset({409, 502, 503, 504})


class QuotaClientError(Exception):
    """Base of the client's errors."""


class QuotaRequestError(QuotaClientError):
    """The server refused the request itself (400, 401, 403, 404, 422...)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class QuotaUnavailable(QuotaClientError):
    """No answer within the deadline; ``last`` is the last failure (an exception or text)."""

    def __init__(self, attempts: int, last: str):
        super().__init__(f"no answer after {attempts} attempts: {last}")
        self.attempts, self.last = attempts, last


@dataclass(frozen=True, slots=True)
class Period:
    limit: int | None  # None: unlimited
    used: int
    remaining: int | None
    resets_at: datetime


def _periods(body: dict[str, Any]) -> dict[str, Period]:
    return {
        name: Period(p["limit"], p["used"], p["remaining"], datetime.fromisoformat(p["resets_at"]))
        for name, p in body.get("periods", {}).items()
    }


@dataclass(frozen=True, slots=True)
class QuotaResult:
    """The answer to a check or a consume."""

    allowed: bool
    periods: dict[str, Period]
    throttle_factor: float
    retry_after: float | None = None  # seconds, when refused
    reason: str | None = None  # "quota_exceeded" | "system_overloaded"
    replayed: bool = False  # the stored answer to an earlier attempt with the same key
    key: str | None = None  # the consume's Idempotency-Key (pass it to refund)
    body: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, slots=True)
class RefundResult:
    count: int
    refunded_periods: list[str]
    closed_periods: list[str]
    periods: dict[str, Period]
    replayed: bool = False


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``deadline`` bounds a whole call, retries included; each attempt gets at most
    ``attempt_timeout``; delays grow from ``base_delay`` to ``max_delay`` with full jitter
    (a random fraction of the step, so that many clients do not retry in step)."""

    deadline: float = 10.0
    attempt_timeout: float = 5.0
    base_delay: float = 0.1
    max_delay: float = 2.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        step = min(self.max_delay, self.base_delay * 2**attempt)
        return max(random.uniform(0, step), retry_after or 0.0)


@dataclass(slots=True)
class _Answer:
    status: int  # 0: no HTTP answer (connection refused, reset, timed out)
    headers: dict[str, str]
    body: bytes
    error: str = ""


class _Calls:
    """What both clients share: requests, reading answers, the retry decision."""

    def __init__(self, url: str, token: str | None, retry: RetryPolicy | None):
        self.url = url.rstrip("/")
        self.token = token
        self.retry = retry or RetryPolicy()

    def request(
        self, path: str, body: dict[str, Any], key: str | None
    ) -> tuple[str, dict[str, str], bytes]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if key is not None:
            headers["Idempotency-Key"] = key
        return self.url + path, headers, json.dumps(body).encode()

    @staticmethod
    def retry_after(answer: _Answer) -> float | None:
        value = answer.headers.get("retry-after")
        try:
            return float(value) if value is not None else None
        except ValueError:
            return None

    def after(self, attempt: int, answer: _Answer, started: float) -> float | None:
        """None if ``answer`` ends the call, else the seconds to wait before the next
        attempt; QuotaUnavailable once the deadline leaves no time for one."""
        if answer.status != 0 and answer.status not in RETRY_STATUSES:
            return None
        delay = self.retry.delay(attempt, self.retry_after(answer))
        if time.monotonic() + delay < started + self.retry.deadline:
            return delay
        if _decision(answer) is not None:
            return None  # still shedding load at the deadline: that is the answer
        raise QuotaUnavailable(attempt + 1, answer.error or f"HTTP {answer.status}")

    def timeout(self, started: float) -> float:
        left = started + self.retry.deadline - time.monotonic()
        return max(0.05, min(self.retry.attempt_timeout, left))

    def result(self, answer: _Answer, key: str | None) -> QuotaResult:
        body = _decision(answer)
        if body is None:
            raise _request_error(answer)
        return QuotaResult(
            allowed=bool(body["allowed"]),
            periods=_periods(body),
            throttle_factor=float(body.get("throttle_factor", 1.0)),
            retry_after=None if body["allowed"] else self.retry_after(answer),
            reason=body.get("reason"),
            replayed=answer.headers.get("idempotent-replayed") == "true",
            key=key,
            body=body,
        )

    @staticmethod
    def refund_result(answer: _Answer) -> RefundResult:
        if answer.status != 200:
            raise _request_error(answer)
        body = json.loads(answer.body)
        return RefundResult(
            count=body["count"],
            refunded_periods=body["refunded_periods"],
            closed_periods=body["closed_periods"],
            periods=_periods(body),
            replayed=answer.headers.get("idempotent-replayed") == "true",
        )


def _decision(answer: _Answer) -> dict[str, Any] | None:
    """The decision in a 200, 429 or load-shedding 503 (None for an error envelope)."""
    if answer.status not in (200, 429, 503):
        return None
    try:
        body = json.loads(answer.body)
    except ValueError:
        return None
    return body if isinstance(body, dict) and "allowed" in body else None


def _request_error(answer: _Answer) -> QuotaRequestError:
    try:
        error = json.loads(answer.body)["error"]
        return QuotaRequestError(answer.status, error["code"], error["message"])
    except (ValueError, KeyError, TypeError):
        return QuotaRequestError(answer.status, "http_error", answer.body[:200].decode("latin-1"))


class QuotaClient:
    """Blocking client (standard library only). Thread-safe: it keeps no connection."""

    def __init__(self, url: str, token: str | None = None, retry: RetryPolicy | None = None):
        self._calls = _Calls(url, token, retry)

    def check(self, user: str, command_type: str, count: int = 1) -> QuotaResult:
        """Would ``count`` commands be admitted now? Counts nothing."""
        body = {"user": user, "command_type": command_type, "count": count}
        return self._calls.result(self._send("/api/quotas/check", body, None), None)

    def consume(
        self, user: str, command_type: str, count: int = 1, key: str | None = None
    ) -> QuotaResult:
        """Count ``count`` commands, exactly once however often the call is retried.

        ``key`` names the logical consume (drawn at random if None): reuse it to retry a
        consume yourself, and pass it to :meth:`refund`.
        """
        key = key or uuid.uuid4().hex
        body = {"user": user, "command_type": command_type, "count": count}
        return self._calls.result(self._send("/api/quotas/consume", body, key), key)

    def refund(self, user: str, command_type: str, key: str) -> RefundResult:
        """Give back the consume made with ``key`` (once; a repeat changes nothing)."""
        body = {"user": user, "command_type": command_type, "key": key}
        return self._calls.refund_result(self._send("/api/quotas/refund", body, None))

    def _send(self, path: str, body: dict[str, Any], key: str | None) -> _Answer:
        calls, started = self._calls, time.monotonic()
        url, headers, data = calls.request(path, body, key)
        attempt = 0
        while True:
            answer = self._attempt(url, headers, data, calls.timeout(started))
            delay = calls.after(attempt, answer, started)
            if delay is None:
                return answer
            time.sleep(delay)
            attempt += 1

    @staticmethod
    def _attempt(url: str, headers: dict[str, str], data: bytes, timeout: float) -> _Answer:
        request = urllib.request.Request(url, data=data, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                return _Answer(resp.status, _lower(resp.headers), resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return _Answer(exc.code, _lower(exc.headers), exc.read())
        except (OSError, http.client.HTTPException) as exc:  # refused, reset, cut, timed out
            return _Answer(0, {}, b"", error=repr(exc))


class AsyncQuotaClient:
    """The same API for asyncio programs (Tornado's HTTP client); methods are coroutines."""

    def __init__(self, url: str, token: str | None = None, retry: RetryPolicy | None = None):
        self._calls = _Calls(url, token, retry)

    async def check(self, user: str, command_type: str, count: int = 1) -> QuotaResult:
        """Would ``count`` commands be admitted now? Counts nothing."""
        body = {"user": user, "command_type": command_type, "count": count}
        return self._calls.result(await self._send("/api/quotas/check", body, None), None)

    async def consume(
        self, user: str, command_type: str, count: int = 1, key: str | None = None
    ) -> QuotaResult:
        """Count ``count`` commands exactly once (see :meth:`QuotaClient.consume`)."""
        key = key or uuid.uuid4().hex
        body = {"user": user, "command_type": command_type, "count": count}
        return self._calls.result(await self._send("/api/quotas/consume", body, key), key)

    async def refund(self, user: str, command_type: str, key: str) -> RefundResult:
        """Give back the consume made with ``key`` (once; a repeat changes nothing)."""
        body = {"user": user, "command_type": command_type, "key": key}
        return self._calls.refund_result(await self._send("/api/quotas/refund", body, None))

    async def _send(self, path: str, body: dict[str, Any], key: str | None) -> _Answer:
        calls, started = self._calls, time.monotonic()
        url, headers, data = calls.request(path, body, key)
        http = AsyncHTTPClient()
        attempt = 0
        while True:
            timeout = calls.timeout(started)
            request = HTTPRequest(
                url, method="POST", headers=headers, body=data,
                connect_timeout=timeout, request_timeout=timeout,
            )  # fmt: skip
            try:
                resp = await http.fetch(request, raise_error=False)
                if resp.code == 599:  # Tornado's code for "no HTTP answer"
                    raise HTTPClientError(599, str(resp.error))
                answer = _Answer(resp.code, _lower(resp.headers), resp.body or b"")
            except (OSError, HTTPClientError, StreamClosedError) as exc:  # no HTTP answer
                answer = _Answer(0, {}, b"", error=repr(exc))
            delay = calls.after(attempt, answer, started)
            if delay is None:
                return answer
            await asyncio.sleep(delay)
            attempt += 1


def _lower(headers: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}
