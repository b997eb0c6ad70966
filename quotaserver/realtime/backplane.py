"""Fan-out between instances: the hub's publish seam, in-process or over Redis.

Redis carries notifications; the database carries truth. After COMMIT an instance
delivers its own event locally and publishes the encoded message on one Redis channel;
every instance hands what arrives to its :class:`~.sequencer.Sequencer`, which delivers
each seq once and in order, and backfills from the event log whatever Redis did not bring
(a message lost while disconnected, or never published). So Redis is never on the
consume path: publishing only queues, and an outage costs live latency, never events.

Live-only events (``durable=False``: a plugin's ``usage`` updates, say) have no seq and no
log to backfill from: they travel best effort on a second channel (``<channel>:live``),
tagged with the sending process so it does not deliver its own twice, and are lost while
Redis is unreachable, as they would be for a client that is not connected. A third channel
(``<channel>:control``) carries nudges between instances ("the credentials changed: reload
them now"); losing one costs the database poll's bound, never a decision.

Every message on every channel is signed: ``<hex HMAC-SHA256 of the text>.<text>`` with the
cluster secret (``backplane.secret``). Anything that does not verify is dropped before it is
decoded, counted in ``rejected`` and logged at most once a minute, so a client of Redis
without the secret can neither inject, shadow nor reorder an event.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import hmac
import json
import logging
import random
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ..windows import isoformat, utc_now
from .messages import Message

log = logging.getLogger(__name__)

Deliver = Callable[[Message], None]
Resync = Callable[[], None]
Control = Callable[[dict[str, Any]], None]
_MAC_HEX = 64  # hex digits of an HMAC-SHA256


def sign(secret: bytes, text: str) -> str:
    """``text`` as published: its HMAC-SHA256 with ``secret`` (hex), a dot, the text."""
    mac = hmac.new(secret, text.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()
    return f"{mac}.{text}"


def verify(secret: bytes, raw: bytes | str) -> bytes | None:
    """The text of a signed message, or None if its signature does not verify."""
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    if len(data) <= _MAC_HEX or data[_MAC_HEX : _MAC_HEX + 1] != b".":
        return None
    mac, text = data[:_MAC_HEX], data[_MAC_HEX + 1 :]
    expected = hmac.new(secret, text, hashlib.sha256).hexdigest().encode()
    return text if hmac.compare_digest(mac, expected) else None


class Backplane(abc.ABC):
    """Carries committed durable events to the other instances."""

    kind = "?"

    def __init__(self) -> None:
        self.connected = False
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.lag: float | None = None  # seconds from commit to arrival, last remote event
        self.received = 0
        self.dropped = 0
        self.rejected = 0  # messages whose signature did not verify

    @abc.abstractmethod
    async def start(
        self,
        deliver: Deliver,
        resync: Resync,
        deliver_live: Deliver | None = None,
        control: Control | None = None,
    ) -> None:
        """Begin delivering remote events to ``deliver`` (live-only ones to
        ``deliver_live``, nudges to ``control``); call ``resync`` after each (re)connection
        so the caller can backfill what it missed."""

    @abc.abstractmethod
    def publish(self, message: Message) -> None:
        """Queue a committed event for the other instances; never blocks, never raises."""

    def publish_live(self, message: Message) -> None:  # noqa: B027 - nobody else to tell
        """Queue a live-only event (no seq) for the other instances, best effort."""

    def publish_control(self, data: dict[str, Any]) -> None:  # noqa: B027 - nobody to tell
        """Queue a nudge for the other instances (e.g. ``{"credentials": version}``)."""

    async def stop(self) -> None:  # noqa: B027 - optional: nothing to release by default
        """Stop delivering and release connections."""

    def health(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "connected": self.connected,
            "last_error": self.last_error,
            "last_error_at": (
                isoformat_epoch(self.last_error_at) if self.last_error_at is not None else None
            ),
            "lag": round(self.lag, 4) if self.lag is not None else None,
            "received": self.received,
            "dropped": self.dropped,
            "rejected": self.rejected,
        }


def isoformat_epoch(seconds: float) -> str:
    return isoformat(datetime.fromtimestamp(seconds, UTC))


class LocalBackplane(Backplane):
    """One instance: its own events are all there is, and they are delivered locally."""

    kind = "local"

    def __init__(self) -> None:
        super().__init__()
        self.connected = True

    async def start(
        self,
        deliver: Deliver,
        resync: Resync,
        deliver_live: Deliver | None = None,
        control: Control | None = None,
    ) -> None:
        return None

    def publish(self, message: Message) -> None:
        return None


def decode(raw: bytes | str) -> Message:
    """A message as published by :meth:`RedisBackplane.publish` (the envelope's JSON)."""
    envelope = json.loads(raw)
    seq = envelope["seq"]
    if not isinstance(seq, int) or isinstance(seq, bool):
        raise ValueError("seq must be an integer")
    return Message(envelope["type"], envelope["data"], seq=seq, timestamp=envelope["timestamp"])


def encode_live(origin: str, message: Message) -> str:
    """A live-only message for the live channel: the sender and the client envelope."""
    return f'{{"from":{json.dumps(origin)},"message":{message.text}}}'


def decode_live(raw: bytes | str) -> tuple[str, Message]:
    """``(sender, message)`` of :func:`encode_live`'s text; the message has no seq."""
    outer = json.loads(raw)
    origin, envelope = outer["from"], outer["message"]
    if not isinstance(origin, str) or "seq" in envelope:
        raise ValueError("not a live-only message")
    if not isinstance(envelope["type"], str) or not isinstance(envelope["data"], dict):
        raise ValueError("malformed envelope")
    return origin, Message(envelope["type"], envelope["data"], timestamp=envelope["timestamp"])


def _lag(message: Message) -> float | None:
    try:
        sent = datetime.fromisoformat(message.timestamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return max(0.0, (utc_now() - sent).total_seconds())


class RedisBackplane(Backplane):
    """Redis pub/sub on one channel, reconnecting with capped exponential back-off."""

    kind = "redis"
    #: Messages waiting for the publisher connection; beyond this they are dropped (the
    #: other instances backfill them from the event log).
    max_queue = 10_000

    def __init__(self, url: str, channel: str, secret: str, *, max_backoff: float = 5.0):
        super().__init__()
        if not secret:  # the config requires one (backplane.secret)
            raise ValueError("a Redis backplane needs a secret")
        self.url = url
        self.channel = channel
        self.live_channel = f"{channel}:live"
        self.control_channel = f"{channel}:control"
        self._secret = secret.encode()
        self._rejected_logged = 0.0
        self.origin = uuid.uuid4().hex  # this process, on the live channel
        self.max_backoff = max_backoff
        self._queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue(self.max_queue)
        self._tasks: list[asyncio.Task] = []
        self._deliver: Deliver | None = None
        self._deliver_live: Deliver | None = None
        self._control: Control | None = None
        self._resync: Resync | None = None

    def client(self) -> Any:
        """A new redis.asyncio client for this backplane's Redis."""
        import redis.asyncio as redis

        # Bounded waits: a dead or hung Redis is noticed within seconds.
        return redis.Redis.from_url(
            self.url, socket_connect_timeout=2, socket_timeout=5, health_check_interval=5
        )

    async def start(
        self,
        deliver: Deliver,
        resync: Resync,
        deliver_live: Deliver | None = None,
        control: Control | None = None,
    ) -> None:
        self._deliver, self._resync, self._deliver_live = deliver, resync, deliver_live
        self._control = control
        self._tasks = [
            asyncio.create_task(self._subscribe_forever(), name="backplane-subscribe"),
            asyncio.create_task(self._publish_forever(), name="backplane-publish"),
        ]

    def publish(self, message: Message) -> None:
        self._put(self.channel, message.text)

    def publish_live(self, message: Message) -> None:
        self._put(self.live_channel, encode_live(self.origin, message))

    def publish_control(self, data: dict[str, Any]) -> None:
        self._put(self.control_channel, json.dumps({"from": self.origin, "data": data}))

    def _put(self, channel: str, text: str) -> None:
        try:
            self._queue.put_nowait((channel, sign(self._secret, text)))
        except asyncio.QueueFull:
            self.dropped += 1

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        self._tasks = []

    def _failed(self, what: str, exc: BaseException) -> None:
        text = f"{what}: {exc.__class__.__name__}: {exc}".strip()
        if self.connected or self.last_error != text:
            log.warning("backplane %s", text)
        self.connected = False
        self.last_error, self.last_error_at = text, time.time()

    async def _backoff(self, attempt: int) -> None:
        delay = min(self.max_backoff, 0.1 * 2**attempt)
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _subscribe_forever(self) -> None:
        handlers = {
            self.channel: self._received,
            self.live_channel: self._received_live,
            self.control_channel: self._received_control,
        }
        handlers.update({name.encode(): fn for name, fn in list(handlers.items())})
        attempt = 0
        while True:
            client = self.client()
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel, self.live_channel, self.control_channel)
                if not self.connected:
                    log.info("backplane connected to %s", self.channel)
                self.connected, attempt = True, 0
                assert self._resync is not None
                self._resync()  # what was published while we were away
                while True:
                    item = await pubsub.get_message(timeout=1.0)
                    if item is not None and item.get("type") == "message":
                        handle = handlers.get(item.get("channel"))
                        text = verify(self._secret, item["data"])
                        if text is None:
                            self._reject()
                        elif handle is not None:
                            handle(text)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any fault: reconnect
                self._failed("subscription lost", exc)
            finally:
                await _close(pubsub, client)
            await self._backoff(attempt)
            attempt += 1

    def _received(self, raw: bytes) -> None:
        try:
            message = decode(raw)
        except (ValueError, KeyError, TypeError):
            log.warning("backplane: ignored a malformed message")
            return
        self.received += 1
        self.lag = _lag(message)
        assert self._deliver is not None
        self._deliver(message)

    def _reject(self) -> None:
        """A message without a valid signature: never decoded, counted, logged once a
        minute at most (a flood must not flood the log too)."""
        self.rejected += 1
        now = time.monotonic()
        if now - self._rejected_logged >= 60:
            self._rejected_logged = now
            log.warning(
                "backplane: dropped a message without a valid signature (%d so far): "
                "something that is not an instance of this deployment publishes on %s",
                self.rejected,
                self.channel,
            )

    def _received_control(self, raw: bytes) -> None:
        try:
            outer = json.loads(raw)
            origin, data = outer["from"], outer["data"]
        except (ValueError, KeyError, TypeError):
            log.warning("backplane: ignored a malformed control message")
            return
        if origin != self.origin and isinstance(data, dict) and self._control is not None:
            self._control(data)

    def _received_live(self, raw: bytes) -> None:
        try:
            origin, message = decode_live(raw)
        except (ValueError, KeyError, TypeError):
            log.warning("backplane: ignored a malformed live message")
            return
        if origin != self.origin and self._deliver_live is not None:
            self._deliver_live(message)

    async def _publish_forever(self) -> None:
        client = self.client()
        attempt = 0
        try:
            while True:
                channel, text = await self._queue.get()
                try:
                    await client.publish(channel, text)
                    attempt = 0
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - dropped; receivers backfill
                    self.dropped += 1
                    self._failed("publish failed", exc)
                    await self._backoff(attempt)
                    attempt += 1
        finally:
            await _close(None, client)


async def _close(pubsub: Any, client: Any) -> None:
    try:
        if pubsub is not None:
            await pubsub.aclose()
        await client.aclose()
    except Exception:  # noqa: BLE001 - closing a broken connection
        log.debug("backplane: close failed", exc_info=True)


def make_backplane(url: str, channel: str, secret: str = "") -> Backplane:
    """The backplane named by ``backplane.url`` (empty: in-process)."""
    return RedisBackplane(url, channel, secret) if url else LocalBackplane()
