"""Notify: alerts (and optionally violations) delivered to webhooks, chat channels and email.

Off until configured: without ``plugins.notify.targets`` it does nothing. Each target is a
route (``events``, ``min_severity``, ``alert_types``) to one receiver (``kind``: webhook,
chat or email); docs/operations.md shows a complete configuration.

**The event log is the outbox.** Every target has a cursor, the seq of the last event it is
done with, saved in ``app.plugin_storage``. A worker task per target reads the events after
its cursor (``app.read_events``), keeps those its route wants (at most ``max_queue`` in
memory; the rest wait in the log), delivers them one by one in seq order with retries, and
moves the cursor after each. ``on_event`` only wakes the workers, so a consume never waits
for a delivery, and what was not delivered before a crash is delivered after the restart:
at least once, each delivery with an id (the same on every retry and after a restart) that
receivers use to drop repeats. A target's first start begins at the current end of the log.

Retries: connection errors, timeouts, 5xx, 408 and 429 are retried with exponential backoff
and jitter (``retry``), honouring Retry-After; other answers fail the delivery at once. A
delivery that used all its attempts counts as failed and the worker moves on.

Email: one message per alert, and while more than ``smtp.digest_after`` alerts arrived
within ``smtp.digest_window`` seconds, one digest at the end of that window instead.
SMTP (smtplib, STARTTLS, login) runs on the plugin's own thread pool.

Alert events are delivered when an alert opens and when it is resolved; repeats (count) and
acknowledgements are not (the receiver has the alert already).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import re
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tornado.httpclient import AsyncHTTPClient

from quotaserver import EventEmitter, MetricSample, hookimpl

from . import notify_send as send

NAME = "notify"
log = logging.getLogger("quotaserver.notify")

KINDS = ("webhook", "chat", "email")
EVENTS = ("alert", "violation")
# min_severity accepts the alert severities and the usual pager words for them.
SEVERITY_RANK = {
    "low": 0,
    "info": 0,
    "medium": 1,
    "warning": 1,
    "high": 2,
    "critical": 3,
}
TARGET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MIN_SECRET = 16
READ_BATCH = 200  # events read from the log at a time
POLL_INTERVAL = 5.0  # seconds a worker waits for a wake-up before it reads the log anyway
SAVE_INTERVAL = 1.0  # seconds between cursor writes while deliveries follow each other
DIGEST_MAX = 100  # alerts in one digest email
DEFAULTS: dict[str, Any] = {
    "max_queue": 1000,
    "retry": {"attempts": 12, "base": 1.0, "max": 300.0},
}
TARGET_DEFAULTS: dict[str, Any] = {
    "events": ["alert"],
    "min_severity": "info",
    "alert_types": None,
    "timeout": 10.0,
}
SMTP_DEFAULTS: dict[str, Any] = {
    "port": 587,
    "starttls": True,
    "timeout": 30.0,
    "digest_after": 5,
    "digest_window": 60.0,
}


# -- settings ----------------------------------------------------------------------------
def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _target_errors(i: int, target: Any, names: set[str], block: dict[str, Any]) -> list[str]:
    key = f"plugins.{NAME}.targets[{i}]"
    if not isinstance(target, dict):
        return [f"{key}: must be a mapping"]
    known = {"name", "kind", "url", "secret", "to"} | set(TARGET_DEFAULTS)
    errors = [f"{key}.{k}: unknown setting" for k in target if k not in known]
    errors += _identity_errors(key, target, names)
    errors += _endpoint_errors(key, target, block)
    errors += _filter_errors(key, target)
    return errors


def _identity_errors(key: str, target: dict[str, Any], names: set[str]) -> list[str]:
    """A unique name and a known kind."""
    errors = []
    name = target.get("name")
    if not isinstance(name, str) or not TARGET_NAME.match(name):
        errors.append(f"{key}.name: required, letters, digits, '_', '.', '-' (up to 64)")
    elif name in names:
        errors.append(f"{key}.name: {name!r} is used by another target")
    else:
        names.add(name)
    if target.get("kind") not in KINDS:
        errors.append(f"{key}.kind: must be one of {', '.join(KINDS)}")
    return errors


def _endpoint_errors(key: str, target: dict[str, Any], block: dict[str, Any]) -> list[str]:
    """Where the kind delivers: a URL (and for a webhook its secret), or mail recipients."""
    errors = []
    kind, url, secret = target.get("kind"), target.get("url"), target.get("secret")
    if kind in ("webhook", "chat"):
        if not isinstance(url, str) or not re.match(r"^https?://[^\s/]+", url):
            errors.append(f"{key}.url: required, an http:// or https:// URL")
    elif url is not None:
        errors.append(f"{key}.url: only for webhook and chat targets")
    if kind == "webhook" and secret is None:
        errors.append(f"{key}.secret: required for a webhook (the HMAC key)")
    if secret is not None and (not isinstance(secret, str) or len(secret) < MIN_SECRET):
        errors.append(f"{key}.secret: must be a string of at least {MIN_SECRET} characters")
    if "to" in target and (kind != "email" or not _str_list(target["to"]) or not target["to"]):
        errors.append(f"{key}.to: a non-empty list of addresses, for email targets")
    if kind == "email":
        smtp = block.get("smtp")
        if not isinstance(smtp, dict):
            errors.append(f"{key}: an email target needs plugins.{NAME}.smtp")
        elif "to" not in target and "to" not in smtp:
            errors.append(f"{key}.to: no recipients (set it here or in smtp.to)")
    return errors


def _filter_errors(key: str, target: dict[str, Any]) -> list[str]:
    """Which alerts reach the target, and how long a delivery may take."""
    errors = []
    events = target.get("events", TARGET_DEFAULTS["events"])
    if not _str_list(events) or not events or any(e not in EVENTS for e in events):
        errors.append(f"{key}.events: a non-empty list of {', '.join(EVENTS)}")
    if target.get("min_severity", "info") not in SEVERITY_RANK:
        errors.append(f"{key}.min_severity: one of {', '.join(SEVERITY_RANK)}")
    if target.get("alert_types") is not None and not _str_list(target["alert_types"]):
        errors.append(f"{key}.alert_types: a list of alert types (rule names)")
    if "timeout" in target and not _positive(target["timeout"]):
        errors.append(f"{key}.timeout: must be a positive number of seconds")
    return errors


def _smtp_errors(smtp: Any) -> list[str]:
    key = f"plugins.{NAME}.smtp"
    if not isinstance(smtp, dict):
        return [f"{key}: must be a mapping"]
    known = {"host", "username", "password", "from", "to", "ca_file"} | set(SMTP_DEFAULTS)
    errors = [f"{key}.{k}: unknown setting" for k in smtp if k not in known]
    if not isinstance(smtp.get("host"), str) or not smtp["host"]:
        errors.append(f"{key}.host: required")
    port = smtp.get("port", 587)
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        errors.append(f"{key}.port: a port number")
    if not isinstance(smtp.get("starttls", True), bool):
        errors.append(f"{key}.starttls: true or false")
    if not isinstance(smtp.get("from"), str) or "@" not in smtp.get("from", ""):
        errors.append(f"{key}.from: required, an address")
    if "to" in smtp and (not _str_list(smtp["to"]) or not smtp["to"]):
        errors.append(f"{key}.to: a non-empty list of addresses")
    for name in ("username", "password", "ca_file"):
        if name in smtp and not isinstance(smtp[name], str):
            errors.append(f"{key}.{name}: must be a string")
    if (
        smtp.get("username")
        and not smtp.get("starttls", True)
        and not _loopback(str(smtp.get("host")))
    ):
        errors.append(f"{key}.username: needs starttls: true (the password would travel in clear)")
    return errors + _smtp_timing_errors(key, smtp)


def _smtp_timing_errors(key: str, smtp: dict[str, Any]) -> list[str]:
    """How long a delivery may take, and when alerts are sent as one digest."""
    errors = []
    for name in ("timeout", "digest_window"):
        if name in smtp and not _positive(smtp[name]):
            errors.append(f"{key}.{name}: must be a positive number of seconds")
    after = smtp.get("digest_after", 5)
    if not isinstance(after, int) or isinstance(after, bool) or after < 1:
        errors.append(f"{key}.digest_after: a whole number, at least 1")
    return errors


#: Settings that may name an environment variable instead (``secret: {env: HOOK_SECRET}``),
#: so that the YAML need not hold them (a chat webhook's URL is a credential too).
FROM_ENV = {"targets": ("url", "secret"), "smtp": ("username", "password")}


def _from_env(value: Any, key: str, errors: list[str]) -> Any:
    if not (isinstance(value, dict) and list(value) == ["env"]):
        return value
    name = value["env"]
    if not isinstance(name, str) or name not in os.environ:
        errors.append(f"{key}: environment variable {name} is not set")
        return None
    return os.environ[name]


def expand(block: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``block`` with ``{env: NAME}`` values read from the environment, and the errors."""
    errors: list[str] = []
    out = dict(block)
    if isinstance(out.get("targets"), list):
        out["targets"] = [
            {
                **t,
                **{
                    f: _from_env(t[f], f"plugins.{NAME}.targets[{i}].{f}", errors)
                    for f in FROM_ENV["targets"]
                    if f in t
                },
            }
            if isinstance(t, dict)
            else t
            for i, t in enumerate(out["targets"])
        ]
    smtp = out.get("smtp")
    if isinstance(smtp, dict):
        out["smtp"] = {
            **smtp,
            **{
                f: _from_env(smtp[f], f"plugins.{NAME}.smtp.{f}", errors)
                for f in FROM_ENV["smtp"]
                if f in smtp
            },
        }
    return out, errors


def settings_errors(raw: dict[str, Any]) -> list[str]:
    """Every problem with ``plugins.notify``, each naming its key."""
    block, errors = expand(raw)
    return errors + _block_errors(block)


def _block_errors(block: dict[str, Any]) -> list[str]:
    key = f"plugins.{NAME}"
    errors = [
        f"{key}.{k}: unknown setting"
        for k in block
        if k not in {"enabled", "targets", "smtp", "max_queue", "retry"}
    ]
    targets = block.get("targets", [])
    if not isinstance(targets, list):
        return errors + [f"{key}.targets: must be a list of targets"]
    if "smtp" in block:
        errors += _smtp_errors(block["smtp"])
    names: set[str] = set()
    for i, target in enumerate(targets):
        errors += _target_errors(i, target, names, block)
    max_queue = block.get("max_queue", DEFAULTS["max_queue"])
    if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 1:
        errors.append(f"{key}.max_queue: a whole number, at least 1")
    retry = block.get("retry", {})
    if not isinstance(retry, dict):
        errors.append(f"{key}.retry: must be a mapping (attempts, base, max)")
    else:
        for k, v in retry.items():
            if k not in DEFAULTS["retry"]:
                errors.append(f"{key}.retry.{k}: unknown setting")
            elif k == "attempts" and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                errors.append(f"{key}.retry.attempts: a whole number, at least 1")
            elif k != "attempts" and not _positive(v):
                errors.append(f"{key}.retry.{k}: must be a positive number of seconds")
    return errors


@hookimpl
def validate_config(config: Any) -> list[str]:
    return settings_errors(config.plugin(NAME))


# -- routing -----------------------------------------------------------------------------
@dataclass
class Target:
    """One route and receiver, with what happened to its deliveries."""

    settings: dict[str, Any]
    cursor: int = 0  # every event up to this seq is done (delivered, failed or not wanted)
    read_to: int = 0  # events up to this seq were read from the log
    pending: deque = field(default_factory=deque)  # wanted, read, not done yet
    unread: set[int] = field(default_factory=set)  # wanted seqs announced but not read yet
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    delivered: int = 0
    failed: int = 0
    failing: bool = False  # the latest attempt failed (retrying, or given up)
    last_error: str | None = None
    last_error_at: str | None = None
    last_delivered_at: str | None = None
    digest_sent: deque = field(default_factory=deque)  # event times of single emails
    saved: int = -1  # the cursor as last saved
    saved_at: float = 0.0  # loop time of that save

    @property
    def name(self) -> str:
        return self.settings["name"]

    @property
    def queued(self) -> int:
        return len(self.pending) + len(self.unread)

    def wants(self, message: Any) -> bool:
        s = self.settings
        if message.type not in s["events"]:
            return False
        if message.type != "alert":
            return True
        data = message.data
        if data.get("update") and data.get("status") != "resolved":
            return False  # a repeat or an acknowledgement: the receiver has the alert
        if SEVERITY_RANK.get(data.get("severity"), 0) < SEVERITY_RANK[s["min_severity"]]:
            return False
        return s["alert_types"] is None or data.get("alert_type") in s["alert_types"]

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.settings["kind"],
            "delivered": self.delivered,
            "failed": self.failed,
            "queued": self.queued,
            "failing": self.failing,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "last_delivered_at": self.last_delivered_at,
            "cursor": self.cursor,
        }


class Notifier:
    """The targets of one application and their worker tasks."""

    def __init__(self, app: Any, block: dict[str, Any]):
        self.app = app
        block, _ = expand(block)  # validate_config refused the errors already
        self.max_queue = block.get("max_queue", DEFAULTS["max_queue"])
        self.retry = {**DEFAULTS["retry"], **(block.get("retry") or {})}
        self.smtp = {**SMTP_DEFAULTS, **(block.get("smtp") or {})}
        self.targets = [
            Target({**TARGET_DEFAULTS, **t, "events": t.get("events", ["alert"])})
            for t in block.get("targets") or []
        ]
        self.tasks: list[asyncio.Task] = []
        self.http: AsyncHTTPClient | None = None

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self, _emit: Any) -> None:
        if not self.targets:
            return
        # Where a new target begins: the end of the log now, before anything can await
        # (an event committed while the cursors load must not be skipped).
        start = self.app.last_seq
        self.http = AsyncHTTPClient(force_instance=True, max_clients=max(10, len(self.targets)))
        # Started here, as the plugin: the tasks' threads (SMTP, name lookups) come from
        # the plugin's own pool.
        self.tasks = [asyncio.ensure_future(self._work(t, start)) for t in self.targets]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()  # an undelivered event keeps its place: the cursor did not move
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=1)
        for target in self.targets:  # what was delivered since the last save
            if target.cursor != target.saved:
                with contextlib.suppress(Exception):  # a crash would repeat it, no worse
                    await asyncio.wait_for(self._save_cursor(target), 1)
        if self.http is not None:
            self.http.close()

    def announce(self, message: Any) -> None:
        """A durable event committed: tell the workers (they read it from the log)."""
        for target in self.targets:
            fresh = message.seq > target.read_to and len(target.unread) < 10 * self.max_queue
            if fresh and target.wants(message):
                target.unread.add(message.seq)
            target.wake.set()

    # -- the worker ----------------------------------------------------------------------
    async def _work(self, target: Target, start: int) -> None:
        await self._load_cursor(target, start)
        while True:
            try:
                if not target.pending and not await self._refill(target):
                    if target.cursor != target.saved:
                        await self._save_cursor(target)
                    await self._idle(target)
                    continue
                batch = await self._next_batch(target)
                await self._deliver(target, batch)
                for _ in batch:
                    target.pending.popleft()
                target.cursor = batch[-1].seq
                # Saved at most every SAVE_INTERVAL during a burst (and when it ends): a
                # crash repeats at most that much, with the same delivery ids.
                if asyncio.get_running_loop().time() - target.saved_at >= SAVE_INTERVAL:
                    await self._save_cursor(target)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a database hiccup: try again soon
                log.warning("notify %s: %s", target.name, exc)
                await asyncio.sleep(1.0)

    async def _load_cursor(self, target: Target, start: int) -> None:
        while True:
            try:
                saved = await self.app.plugin_storage.load(NAME)
                break
            except Exception as exc:  # noqa: BLE001 - the database may come back
                log.warning("notify %s: cannot read the cursor: %s", target.name, exc)
                await asyncio.sleep(1.0)
        cursor = saved.get(f"cursor:{target.name}")
        if cursor is None:  # a new target starts at the end of the log, not its beginning
            target.cursor = start
            with contextlib.suppress(Exception):  # saved again after the first delivery
                await self._save_cursor(target)
        else:
            target.cursor = target.saved = int(cursor)
        target.read_to = target.cursor

    async def _save_cursor(self, target: Target) -> None:
        cursor = target.cursor
        await self.app.plugin_storage.save(NAME, f"cursor:{target.name}", cursor)
        target.saved, target.saved_at = cursor, asyncio.get_running_loop().time()

    async def _refill(self, target: Target) -> bool:
        """Read wanted events after ``read_to`` into ``pending``; False when none is left."""
        target.wake.clear()  # before the read: an event committed after it wakes us again
        while len(target.pending) < self.max_queue:
            events = await self.app.read_events(target.read_to, READ_BATCH)
            if not events:
                break
            for message in events:
                target.read_to = message.seq
                target.unread.discard(message.seq)
                if target.wants(message):
                    target.pending.append(message)
                    if len(target.pending) >= self.max_queue:
                        break  # the rest waits in the log
        if not target.pending and target.read_to > target.cursor:
            target.cursor = target.read_to  # nothing wanted in between: skip it
        return bool(target.pending)

    async def _idle(self, target: Target) -> None:
        with contextlib.suppress(TimeoutError):  # read the log anyway now and then
            await asyncio.wait_for(target.wake.wait(), POLL_INTERVAL)

    async def _next_batch(self, target: Target) -> list[Any]:
        """The head event; for email during a burst, the digest it starts."""
        head = target.pending[0]
        if target.settings["kind"] != "email":
            return [head]
        window = self.smtp["digest_window"]
        at = _event_time(head)
        sent = target.digest_sent
        while sent and sent[0] < at - window:
            sent.popleft()
        if len(sent) < self.smtp["digest_after"]:
            sent.append(at)
            return [head]
        # A burst: everything that arrives until the window is over goes out as one digest.
        deadline = at + window
        wait = deadline - self.app.clock().timestamp()
        if wait > 0:
            await asyncio.sleep(wait)
        await self._refill(target)
        batch = []
        for message in target.pending:
            if len(batch) >= DIGEST_MAX or (batch and _event_time(message) >= deadline):
                break
            batch.append(message)
        return batch

    async def _deliver(self, target: Target, batch: list[Any]) -> None:
        """Send with retries; count the outcome. Returns when done either way."""
        delivery = send.delivery_id(target.name, batch)
        attempts = self.retry["attempts"]
        for attempt in range(1, attempts + 1):
            try:
                await self._send(target, batch, delivery)
            except send.Retry as exc:
                self._failed_attempt(target, str(exc))
                if attempt == attempts:
                    break
                await asyncio.sleep(self._backoff(attempt, exc.after))
                continue
            except send.Refused as exc:
                self._failed_attempt(target, str(exc))
                break
            except Exception as exc:  # noqa: BLE001 - a message we cannot build: no retry
                log.exception("notify %s: cannot deliver seq %s", target.name, batch[0].seq)
                self._failed_attempt(target, f"{type(exc).__name__}: {exc}")
                break
            target.delivered += len(batch)
            target.failing = False
            target.last_delivered_at = _now(self.app)
            return
        target.failed += len(batch)
        log.error(
            "notify %s: delivery %s (seq %s) failed: %s",
            target.name,
            delivery,
            batch[0].seq if len(batch) == 1 else f"{batch[0].seq}-{batch[-1].seq}",
            target.last_error,
        )

    def _failed_attempt(self, target: Target, error: str) -> None:
        target.failing = True
        target.last_error = error[:300]
        target.last_error_at = _now(self.app)
        log.warning("notify %s: %s", target.name, target.last_error)

    def _backoff(self, attempt: int, after: float | None) -> float:
        """Exponential, capped, with jitter (half fixed, half random: receivers that come
        back are not hit by every sender at once); a Retry-After within the cap wins."""
        ceiling = min(self.retry["max"], self.retry["base"] * 2 ** (attempt - 1))
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        if after is not None:
            delay = max(delay, min(after, self.retry["max"]))
        return delay

    async def _send(self, target: Target, batch: list[Any], delivery: str) -> None:
        kind = target.settings["kind"]
        if kind == "email":
            to = target.settings.get("to") or self.smtp["to"]
            mail = send.email_message(self.smtp, to, batch, delivery)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, send.send_email, self.smtp, to, mail)
            return
        message = batch[0]
        if kind == "chat":
            body = send.chat_body(message)
        else:
            body = send.webhook_body(target.name, message, delivery)
        await send.post(self.http, target.settings, body, message.type, delivery)


def _event_time(message: Any) -> float:
    return datetime.fromisoformat(message.timestamp).timestamp()


def _now(app: Any) -> str:
    """RFC 3339 UTC with milliseconds, as the event timestamps are written."""
    now = app.clock().astimezone(UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _notifier(app: Any) -> Notifier:
    state = app.plugin_state(NAME)
    if "notifier" not in state:
        state["notifier"] = Notifier(app, app.plugin_config(NAME))
    return state["notifier"]


# -- hooks -------------------------------------------------------------------------------
@hookimpl
def register_emitters(app: Any) -> list[EventEmitter]:
    notifier = _notifier(app)
    return [EventEmitter("notify", notifier.start, notifier.stop)]


@hookimpl
def on_event(app: Any, message: Any) -> None:
    # A plain function: it runs for every durable event (violations too) and only wakes.
    notifier = app.plugin_state(NAME).get("notifier")
    if notifier is not None and message.seq is not None:
        notifier.announce(message)


@hookimpl
def health_fields(app: Any) -> dict[str, Any] | None:
    notifier = app.plugin_state(NAME).get("notifier")
    if notifier is None or not notifier.targets:
        return None
    return {
        "healthy": not any(t.failing for t in notifier.targets),
        "targets": {t.name: t.to_json() for t in notifier.targets},
    }


@hookimpl
def stats_fields(app: Any) -> dict[str, Any] | None:
    # The dashboard shows a plugin's stats field as a card: one line per target.
    notifier = app.plugin_state(NAME).get("notifier")
    if notifier is None or not notifier.targets:
        return None
    lines = {}
    for t in notifier.targets:
        line = f"{t.delivered} delivered · {t.failed} failed · {t.queued} queued"
        if t.failing:
            line += f" · failing: {t.last_error}"
        lines[t.name] = line
    return {"notifications": lines}


@hookimpl
def metric_samples(app: Any) -> list[MetricSample] | None:
    notifier = app.plugin_state(NAME).get("notifier")
    if notifier is None:
        return None
    samples = []
    for t in notifier.targets:
        labels = {"target": t.name, "kind": t.settings["kind"]}
        samples += [
            MetricSample(
                "quotaserver_notify_delivered",
                t.delivered,
                labels,
                "Events delivered to a notification target.",
                "counter",
            ),
            MetricSample(
                "quotaserver_notify_failed",
                t.failed,
                labels,
                "Events whose delivery failed for good (attempts used up, or refused).",
                "counter",
            ),
            MetricSample(
                "quotaserver_notify_queued",
                t.queued,
                labels,
                "Events waiting for delivery to a notification target.",
            ),
            MetricSample(
                "quotaserver_notify_failing",
                1 if t.failing else 0,
                labels,
                "1 while the latest delivery attempt to the target failed.",
            ),
        ]
    return samples
