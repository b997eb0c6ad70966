"""Waiting for a condition: poll it, and fail with a message when it never comes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

# Generous: a busy machine makes things slow, never wrong. A wait costs its full timeout
# only when the test is about to fail anyway.
DEFAULT_TIMEOUT = 20.0


async def wait_until(
    predicate: Callable[[], object], what: str, timeout: float = DEFAULT_TIMEOUT
) -> None:
    """Poll ``predicate`` on the running loop until it is true; else fail naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


def wait_until_sync(
    predicate: Callable[[], object], what: str, timeout: float = DEFAULT_TIMEOUT
) -> None:
    """The same for code outside an event loop (thread and process checks)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


async def wait_until_async(
    predicate: Callable[[], Awaitable[object]], what: str, timeout: float = DEFAULT_TIMEOUT
) -> None:
    """The same for a condition that has to ask something (an HTTP request, a scrape)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)
