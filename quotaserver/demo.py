"""Demo traffic: simulated users issue commands through the real HTTP quota API.

Used by ``make run`` (``--demo``) so a new dashboard has live numbers at first sight.
A few "heavy" users hit their limits, which makes violations and alerts appear.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

log = logging.getLogger(__name__)

USERS = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy",
    "mallory", "niaj", "olivia", "peggy", "rupert", "sybil", "trent", "victor", "walter",
]  # fmt: skip
HEAVY = {"mallory", "trent"}


class DemoTraffic:
    """A background task that consumes quotas over HTTP at ``rate`` requests per second."""

    def __init__(
        self, app: Any, rate: float = 4.0, seed: int | None = None, token: str | None = None
    ):
        self.app = app
        self.rate = rate
        self.random = random.Random(seed)
        # Workers sharing a port each accept the demo's requests: they share its token.
        self.token = token or secrets.token_urlsafe(24)
        self._task: asyncio.Task | None = None
        self.sent = 0

    async def start(self) -> None:
        self.app.auth.add_token(self.token, "demo", "service")
        # Heavy users get small daily limits so violations happen within minutes.
        for name in HEAVY:
            await self.app.rules.set_user_limits(name, "shell", {"daily": 40}, actor="demo")
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        client = AsyncHTTPClient()
        url = f"{self.app.url}/api/quotas/consume"
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        command_types = list(self.app.quota.command_types)
        while True:
            await asyncio.sleep(self.random.expovariate(self.rate))
            heavy = self.random.random() < 0.3
            user = self.random.choice(sorted(HEAVY) if heavy else USERS)
            command_type = "shell" if heavy else self.random.choice(command_types)
            body = {"user": user, "command_type": command_type, "count": self.random.randint(1, 3)}
            try:
                await client.fetch(url, method="POST", headers=headers, body=json.dumps(body))
            except HTTPClientError as exc:
                if exc.code not in (429, 503):
                    log.warning("demo request failed: %s", exc)
            except OSError as exc:
                log.warning("demo request failed: %s", exc)
            self.sent += 1
