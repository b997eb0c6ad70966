"""Development endpoints (only routed with ``dev: true``; admin only).

They persist and publish through the same services as real events.
"""

from __future__ import annotations

from ..alerts import SEVERITIES
from ..realtime.messages import DURABLE_TYPES
from .base import ApiError, BaseHandler
from .params import validate_username


class TestBroadcastHandler(BaseHandler):
    """POST /api/ws/test-broadcast {"type": "quota_change", "data": {...}}"""

    async def post(self) -> None:
        body = self.json_body({"type", "data"})
        kind = body.get("type", "quota_change")
        data = body.get("data", {})
        if not isinstance(kind, str) or kind not in DURABLE_TYPES or not isinstance(data, dict):
            raise ApiError(400, "invalid_field", "type must be a durable type, data an object")
        message = await self.app.publish_event(kind, {**data, "test": True})
        self.send_json({"seq": message.seq, "type": kind})


class TestViolationHandler(BaseHandler):
    """POST /api/ws/test-violation {"user": "alice", "command_type": "shell"}"""

    async def post(self) -> None:
        body = self.json_body({"user", "command_type"})
        user = validate_username(
            body.get("user", "test-user"), self.app.config["quotas.max_username_length"]
        )
        command_type = body.get("command_type", self.app.quota.command_types[0])
        if command_type not in self.app.quota.command_types:
            raise ApiError(400, "unknown_command_type", "unknown command type")
        violation = await self.app.quota.record_violation(user, command_type, "daily")
        self.send_json({"violation": violation})


class TestAlertHandler(BaseHandler):
    """POST /api/ws/test-alert {"severity": "high", "message": "..."}"""

    async def post(self) -> None:
        body = self.json_body({"severity", "message"})
        severity = body.get("severity", "high")
        message = body.get("message", "Test alert")
        if severity not in SEVERITIES or not isinstance(message, str) or not message:
            raise ApiError(400, "invalid_field", "severity or message is invalid")
        alert = await self.app.alerts.raise_alert(
            "test", severity, message[:500], action="None: this is a test alert"
        )
        self.send_json({"alert": alert})
