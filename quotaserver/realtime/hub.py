"""The broadcaster: clients of both transports, bounded per-client queues, replay.

Every message is encoded once (:class:`Message`) and the same text goes to every client.
A client's queue is the set of writes its transport has not flushed yet; the hub counts
them. A slow client gets its stats coalesced (a full snapshot once it catches up) and,
past ``client_queue`` durable events or ``client_queue_bytes``, is closed with
:data:`CLOSE_SLOW_CONSUMER`; it then reconnects with its last seq and recovers.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from ..events import EventsPruned
from ..windows import isoformat, utc_now
from .messages import CLOSE_GOING_AWAY, CLOSE_SLOW_CONSUMER, CONTROL_TYPES, Message
from .sequencer import Sequencer

log = logging.getLogger(__name__)

ReplaySource = Callable[[int, int], Awaitable[list[Message]]]


class Client(abc.ABC):
    """One live connection, WebSocket or SSE. Transports implement ``write`` and ``close``."""

    transport = "?"
    # True where the transport answers protocol pings (WebSocket): such a client is
    # dropped by :meth:`Hub.reap` once it has been silent for ``client_timeout``.
    expects_pong = False

    def __init__(self, identity: str = "anonymous", types: Iterable[str] | None = None):
        self.id = uuid.uuid4().hex[:16]
        self.identity = identity
        self.types: frozenset[str] | None = frozenset(types) if types is not None else None
        self.pending = 0  # writes not yet flushed to the socket
        self.pending_durable = 0
        self.pending_bytes = 0
        self.stats_stale = False  # a stats update was skipped while behind
        self.backlog: list[Message] | None = None  # live events held back during replay
        self.last_seq = 0  # highest durable seq sent to this client
        self.closed = False
        self.last_seen = time.monotonic()

    def seen(self) -> None:
        """Record a sign of life (a pong or any client message)."""
        self.last_seen = time.monotonic()

    def wants(self, type: str) -> bool:
        return self.types is None or type in CONTROL_TYPES or type in self.types

    @abc.abstractmethod
    def write(self, message: Message) -> asyncio.Future | None:
        """Queue ``message`` on the transport; the future resolves once it is flushed."""

    @abc.abstractmethod
    def close(self, code: int, reason: str) -> None:
        """Close the connection (WebSocket close code; SSE ends the stream)."""


class StatsState:
    """The current stats snapshot; yields deltas of changed top-level fields."""

    def __init__(self) -> None:
        self.current: dict[str, Any] = {}
        self._full: Message | None = None

    def update(self, snapshot: dict[str, Any]) -> dict[str, Any]:
        changed = {k: v for k, v in snapshot.items() if self.current.get(k, object()) != v}
        if changed:
            self.current = {**self.current, **changed}
            self._full = None
        return changed

    def full_message(self) -> Message:
        if self._full is None:
            self._full = Message("stats", {"delta": False, **self.current})
        return self._full


class Hub:
    """Fans messages out to every client; keeps a ring of recent durable events for replay."""

    def __init__(
        self,
        replay_source: ReplaySource,
        *,
        max_connections: int = 1000,
        client_queue: int = 50,
        client_queue_bytes: int = 1 << 20,
        replay_limit: int = 1000,
        ring_size: int = 2000,
        intervals: dict[str, float] | None = None,
    ):
        self.replay_source = replay_source
        self.max_connections = max_connections
        self.client_queue = client_queue
        self.client_queue_bytes = client_queue_bytes
        self.replay_limit = replay_limit
        self.intervals = intervals or {}
        self.plugin_types: tuple[str, ...] = ()  # event types plugins declared (welcome)
        self.clients: set[Client] = set()
        # Live connections per identity, kept with the set: a handshake checks its cap in
        # O(1) (counting the set made connecting N clients O(N^2)).
        self.per_identity: Counter[str] = Counter()
        self.ring: deque[Message] = deque(maxlen=ring_size)
        # Durable events pass through the sequencer: once each, in seq order, whether
        # they come from this instance, another one (the backplane) or the event log.
        self.sequencer = Sequencer(self._broadcast, replay_source)
        self.stats = StatsState()
        self.instance = ""  # named in welcome: which instance a client landed on
        # With several instances, a resuming client may have seen events this instance has
        # not received yet: read the event log before replaying, so the replay includes
        # everything committed before the client came back.
        self.sync_on_recover = False
        self.published = 0
        self.slow_closed = 0

    @property
    def last_seq(self) -> int:
        """Every durable event up to this seq has been delivered (or never existed)."""
        return self.sequencer.head

    @last_seq.setter
    def last_seq(self, seq: int) -> None:
        self.sequencer.head = seq

    # -- connections ---------------------------------------------------------------
    @property
    def full(self) -> bool:
        return len(self.clients) >= self.max_connections

    def count(self, transport: str | None = None) -> int:
        if transport is None:
            return len(self.clients)
        return sum(1 for c in self.clients if c.transport == transport)

    def register(self, client: Client) -> None:
        """Count ``client`` against the limits now and hold its events until ``attach``.

        Transports call this before any await, so simultaneous handshakes cannot all pass
        the ``full`` check.
        """
        if client not in self.clients:
            self.clients.add(client)
            self.per_identity[client.identity] += 1
        if client.backlog is None:
            client.backlog = []

    async def attach(self, client: Client, cursor: str | None = None) -> None:
        """Welcome, stats snapshot, the replay after ``cursor``, then live events."""
        self.register(client)  # live events are held in the backlog until the end
        self._send(client, self._welcome(client))
        if client.wants("stats"):
            self._send(client, self.stats.full_message())
        replayed_to = 0
        if cursor is not None:
            await self._recover(client, cursor)
            if client.closed:
                return
            replayed_to = client.last_seq
        backlog, client.backlog = client.backlog or [], None
        for message in backlog:
            if message.seq > replayed_to:  # the replay may already have included it
                self._deliver(client, message)
        if client.stats_stale and not client.pending and not client.closed:
            client.stats_stale = False
            self._send(client, self.stats.full_message())

    def detach(self, client: Client) -> None:
        client.closed = True
        if client in self.clients:
            self.clients.discard(client)
            left = self.per_identity[client.identity] - 1
            if left:
                self.per_identity[client.identity] = left
            else:
                del self.per_identity[client.identity]

    def close_all(self, code: int, reason: str) -> None:
        for client in list(self.clients):
            self.detach(client)
            client.close(code, reason)

    def reap(self, timeout: float) -> int:
        """Drop clients silent to protocol pings for longer than ``timeout`` seconds."""
        cutoff = time.monotonic() - timeout
        return self.close_where(
            lambda c: c.expects_pong and c.last_seen < cutoff, CLOSE_GOING_AWAY, "ping timeout"
        )

    def close_where(self, predicate: Callable[[Client], bool], code: int, reason: str) -> int:
        victims = [c for c in self.clients if predicate(c)]
        for client in victims:
            self.detach(client)
            client.close(code, reason)
        return len(victims)

    # -- publishing ------------------------------------------------------------------
    def publish(self, message: Message) -> None:
        """Send ``message`` to every client; durable events in seq order, once each."""
        if message.seq is not None:
            self.sequencer.offer(message)
        else:
            self._broadcast(message)

    def _broadcast(self, message: Message) -> None:
        if message.seq is not None:
            self.ring.append(message)  # the sequencer hands them over in order
        self.published += 1
        for client in list(self.clients):
            self._deliver(client, message)

    def publish_stats(self, snapshot: dict[str, Any]) -> bool:
        """Broadcast the fields of ``snapshot`` that changed; return whether any did."""
        changed = self.stats.update(snapshot)
        if changed:
            self.publish(Message("stats", {"delta": True, **changed}))
        return bool(changed)

    def ping(self) -> None:
        self.publish(Message("ping", {"server_time": isoformat(utc_now())}))

    # -- internals -------------------------------------------------------------------
    def _welcome(self, client: Client) -> Message:
        return Message(
            "welcome",
            {
                "protocol": 2,  # docs/protocol.md: "Changes since protocol 1"
                "client_id": client.id,
                "transport": client.transport,
                "instance": self.instance,
                "server_time": isoformat(utc_now()),
                "seq": self.last_seq,
                "intervals": self.intervals,
                "types": sorted(client.types) if client.types is not None else None,
                "plugin_types": self.plugin_types,
            },
        )

    async def _recover(self, client: Client, cursor: str) -> None:
        head = self.last_seq
        after = _cursor_value(cursor)
        if after is None:
            return self._recovered(client, False, head, reason="invalid_cursor")
        if after > head or self.sync_on_recover:
            # A cursor ahead of this instance (it came from another one), or a cluster:
            # catch up from the event log first.
            try:
                await self.sequencer.sync()
            except Exception:
                log.exception("catching up with the event log failed")
                return self._recovered(client, False, head, reason="replay_failed")
            if client.closed:
                return None
            head = self.last_seq
            if after > head:
                return self._recovered(client, False, head, reason="unknown_cursor")
        missed = await self._missed_since(after)
        if client.closed:
            return None
        if isinstance(missed, str):
            return self._recovered(client, False, head, reason=missed)
        if len(missed) > self.replay_limit:
            return self._recovered(client, False, head, reason="too_many_missed")
        sent = 0
        for message in missed:
            if client.wants(message.type):
                self._send(client, message)
                sent += 1
            client.last_seq = max(client.last_seq, message.seq)
        return self._recovered(client, True, head, missed=sent)

    async def _missed_since(self, after: int) -> list[Message] | str:
        """The events after ``after`` (from the ring, else the event log, at most one more
        than the replay limit), or why they cannot be had."""
        missed = self._from_ring(after)
        if missed is not None:
            return missed
        try:
            return await self.replay_source(after, self.replay_limit + 1)
        except EventsPruned:
            return "pruned"
        except Exception:
            log.exception("replay from the event log failed")
            return "replay_failed"

    def _recovered(
        self, client: Client, ok: bool, head: int, missed: int | None = None, reason: str = ""
    ) -> None:
        client.last_seq = max(client.last_seq, head)
        data: dict[str, Any] = {"recovered": ok, "missed": missed, "seq": head}
        if reason:
            data["reason"] = reason
        self._send(client, Message("recovered", data))

    def _from_ring(self, after: int) -> list[Message] | None:
        """Events after ``after`` if the ring holds every one of them, else None.

        Only a gap-free run of ids proves nothing is missing (on PostgreSQL a rolled-back
        transaction leaves a hole): otherwise the event log answers.
        """
        if after >= self.last_seq:
            return []
        missed = [m for m in self.ring if m.seq > after]
        # Distinct ids in (after, last_seq]: as many as that range holds means every one.
        return missed if len(missed) == self.last_seq - after else None

    def _deliver(self, client: Client, message: Message) -> None:
        if client.closed or not client.wants(message.type):
            return
        if message.seq is not None and message.seq <= client.last_seq and client.backlog is None:
            return  # already sent by this client's replay
        if client.backlog is not None:
            if message.seq is not None:
                client.backlog.append(message)
            elif message.type == "stats":
                client.stats_stale = True
            return
        if message.seq is not None:
            over_count = client.pending_durable >= self.client_queue
            over_bytes = client.pending_bytes + len(message.text) > self.client_queue_bytes
            if over_count or over_bytes:
                self.slow_closed += 1
                log.info("closing slow client %s (%s)", client.id, client.transport)
                self.detach(client)
                client.close(CLOSE_SLOW_CONSUMER, "slow consumer: reconnect and resume")
                return
            client.last_seq = max(client.last_seq, message.seq)
        elif message.type == "stats" and client.stats_stale and not client.pending:
            client.stats_stale = False  # a skipped delta: the full snapshot replaces it
            message = self.stats.full_message()
        elif client.pending:
            # Behind: coalesce stats (a full snapshot follows once drained); skip pings.
            if message.type == "stats":
                client.stats_stale = True
            return
        self._send(client, message)

    def _send(self, client: Client, message: Message) -> None:
        try:
            future = client.write(message)
        except Exception:  # the transport is gone; it detaches itself on close
            log.debug("write to %s failed", client.id, exc_info=True)
            self.detach(client)
            return
        if future is None:
            return
        size = len(message.text)
        durable = message.seq is not None
        client.pending += 1
        client.pending_bytes += size
        if durable:
            client.pending_durable += 1
        future.add_done_callback(lambda f: self._flushed(client, size, durable, f))

    def _flushed(self, client: Client, size: int, durable: bool, future: asyncio.Future) -> None:
        if not future.cancelled():
            future.exception()  # consume it: a closed stream is handled by on_close
        client.pending -= 1
        client.pending_bytes -= size
        if durable:
            client.pending_durable -= 1
        if client.pending == 0 and client.stats_stale and not client.closed:
            client.stats_stale = False
            self._send(client, self.stats.full_message())


def _cursor_value(cursor: str) -> int | None:
    """The event id a ``last_seq`` / ``Last-Event-ID`` names, or None if it names none."""
    try:
        after = int(cursor)
    except (TypeError, ValueError):
        return None
    return after if after >= 0 else None
