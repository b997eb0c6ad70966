"""The broadcaster's replay/live hand-over, driven step by step with an in-process client."""

import asyncio
from datetime import UTC, datetime

import pytest
from waits import wait_until

from quotaserver.realtime.hub import Client, Hub
from quotaserver.realtime.messages import Message


class RecordingClient(Client):
    """A transport that records what it is sent (the hub is the unit under test)."""

    transport = "test"

    def __init__(self, types=None):
        super().__init__("tester", types)
        self.sent: list[Message] = []

    def write(self, message):
        self.sent.append(message)
        return None  # flushed at once

    def close(self, code, reason):
        self.closed_with = code


def event(seq: int) -> Message:
    return Message("violation", {"n": seq}, seq=seq)


@pytest.mark.gen_test
async def test_events_during_a_database_replay_follow_it_once_and_in_order():
    stored = [event(s) for s in range(1, 6)]
    gate = asyncio.Event()

    async def replay_source(after, limit):
        await gate.wait()  # the database is slow
        return [m for m in stored if m.seq > after][:limit]

    hub = Hub(replay_source, ring_size=0)
    hub.last_seq = 5
    hub.publish_stats({"commands_today": 1})
    client = RecordingClient()
    attaching = asyncio.ensure_future(hub.attach(client, "2"))
    await asyncio.sleep(0)
    # While the replay query runs: a stats delta, event 5 again (already stored), event 6.
    hub.publish_stats({"commands_today": 2})
    hub.publish(stored[4])
    hub.publish(event(6))
    gate.set()
    await attaching
    kinds = [(m.type, m.seq) for m in client.sent]
    assert kinds[:2] == [("welcome", None), ("stats", None)]
    assert kinds[2:] == [
        ("violation", 3),
        ("violation", 4),
        ("violation", 5),
        ("recovered", None),
        ("violation", 6),
        ("stats", None),
    ]
    assert client.sent[5].data == {"recovered": True, "missed": 3, "seq": 5}
    # The skipped delta is replaced by a full, current snapshot.
    assert client.sent[-1].data == {"delta": False, "commands_today": 2}


@pytest.mark.gen_test
async def test_ring_replays_only_gap_free_runs():
    calls = []

    async def replay_source(after, limit):
        calls.append(after)
        return [event(7), event(9)]

    hub = Hub(replay_source, ring_size=10)
    hub.last_seq = 6
    for seq in (7, 9):  # 8 was rolled back (PostgreSQL) or never reached this instance
        hub.publish(event(seq))
    await hub.sequencer.settled()  # the log read after 7 shows 8 is a hole
    assert hub.last_seq == 9
    calls.clear()
    client = RecordingClient()
    await hub.attach(client, "6")
    assert calls == [6]  # the ring could not prove it holds everything: the log answered
    assert [m.seq for m in client.sent if m.seq] == [7, 9]
    contiguous = RecordingClient()
    await hub.attach(contiguous, "8")
    assert calls == [6]  # 9 alone is a gap-free run after 8: served from memory
    assert [m.seq for m in contiguous.sent if m.seq] == [9]


# -- the unit layer: a transport whose writes stay pending until the test flushes them ---------
class PendingClient(Client):
    """A transport with a socket the test controls: writes stay pending until flushed.

    ``write`` returns a future per message, as Tornado's streams do; :meth:`flush` resolves
    them (the peer read), :meth:`fail` resolves them with an error (the peer went away).
    """

    transport = "fake"
    expects_pong = True

    def __init__(self, types=None, raises: Exception | None = None):
        super().__init__("tester", types)
        self.sent: list[Message] = []
        self.unflushed: list[asyncio.Future] = []
        self.raises = raises
        self.closed_with: tuple[int, str] | None = None

    def write(self, message):
        if self.raises is not None:
            raise self.raises
        self.sent.append(message)
        future = asyncio.get_running_loop().create_future()
        self.unflushed.append(future)
        return future

    def close(self, code, reason):
        self.closed_with = (code, reason)

    async def flush(self, n: int | None = None, error: BaseException | None = None) -> None:
        batch = self.unflushed[:n] if n is not None else list(self.unflushed)
        del self.unflushed[: len(batch)]
        for future in batch:
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
        await asyncio.sleep(0)  # done callbacks run on the next loop iteration

    def kinds(self) -> list[tuple[str, int | None]]:
        return [(m.type, m.seq) for m in self.sent]


def durable(seq: int, type: str = "violation", size: int = 0) -> Message:
    return Message(type, {"n": seq, "pad": "x" * size}, seq=seq)


async def no_replay(after, limit):
    raise AssertionError("the ring should have answered")


async def attached(hub: Hub, client: PendingClient, cursor=None) -> PendingClient:
    await hub.attach(client, cursor)
    await client.flush()  # welcome and snapshot read: the client is idle
    client.sent.clear()
    return client


@pytest.mark.gen_test
async def test_stats_are_coalesced_while_behind_and_a_full_snapshot_follows_catch_up():
    hub = Hub(no_replay)
    hub.publish_stats({"commands_today": 1, "total_users": 1})
    client = await attached(hub, PendingClient())
    hub.publish(durable(1))  # pending: the client is now behind
    for n in (2, 3, 4):
        hub.publish_stats({"commands_today": n})
    hub.ping()
    assert client.kinds() == [("violation", 1)]  # no delta, no ping while behind
    assert (client.pending, client.pending_durable, client.stats_stale) == (1, 1, True)
    await client.flush()
    # Caught up: one full snapshot stands in for the three skipped deltas.
    assert client.kinds() == [("violation", 1), ("stats", None)]
    assert client.sent[-1].data == {"delta": False, "commands_today": 4, "total_users": 1}
    assert client.stats_stale is False
    await client.flush()
    hub.publish_stats({"commands_today": 5})  # idle again: deltas as usual
    assert client.sent[-1].data == {"delta": True, "commands_today": 5}
    assert hub.publish_stats({"commands_today": 5}) is False  # nothing changed: no message
    assert len(client.sent) == 3


@pytest.mark.gen_test
async def test_a_failed_or_cancelled_flush_also_drains_and_triggers_the_snapshot():
    hub = Hub(no_replay)
    client = await attached(hub, PendingClient())
    other = await attached(hub, PendingClient())
    hub.publish(durable(1))
    hub.publish_stats({"commands_today": 1})  # skipped for both: they are behind
    await client.flush(error=ConnectionError("reset"))  # the peer reset the connection
    assert client.kinds() == [("violation", 1), ("stats", None)]
    assert client.sent[-1].data == {"delta": False, "commands_today": 1}
    assert (client.pending, client.pending_durable) == (1, 0)  # only the snapshot in flight
    other.unflushed.pop().cancel()  # the transport dropped the write
    await asyncio.sleep(0)
    assert other.kinds() == [("violation", 1), ("stats", None)]
    assert other.sent[-1].data["delta"] is False


@pytest.mark.gen_test
async def test_a_delta_to_a_stale_idle_client_becomes_the_full_snapshot():
    hub = Hub(no_replay)
    client = await attached(hub, PendingClient())
    hub.publish_stats({"a": 1, "b": 1})
    await client.flush()
    client.stats_stale = True  # a delta was skipped and the drain did not resend yet
    hub.publish_stats({"b": 2})
    assert client.sent[-1].data == {"delta": False, "a": 1, "b": 2}
    assert client.stats_stale is False


@pytest.mark.gen_test
async def test_the_event_count_cap_closes_a_slow_client_and_spares_the_others():
    hub = Hub(no_replay, client_queue=3, client_queue_bytes=1 << 20)
    slow = await attached(hub, PendingClient())
    fast = await attached(hub, PendingClient())
    for seq in (1, 2, 3):
        hub.publish(durable(seq))
        await fast.flush()
    assert slow.pending_durable == 3 and slow.closed_with is None  # at the cap, not over
    hub.publish(durable(4))
    assert slow.closed_with == (4008, "slow consumer: reconnect and resume")
    assert slow.closed and slow not in hub.clients and hub.slow_closed == 1
    assert [m.seq for m in slow.sent] == [1, 2, 3]
    assert slow.last_seq == 3  # it resumes from what it was actually given
    hub.publish(durable(5))
    assert [m.seq for m in fast.sent] == [1, 2, 3, 4, 5]
    assert hub.clients == {fast}
    # A second one over the cap is counted beside the first (the metric and health read it).
    later = await attached(hub, PendingClient())
    for seq in (6, 7, 8, 9):
        hub.publish(durable(seq))
        await fast.flush()
    assert later.closed and hub.slow_closed == 2


@pytest.mark.gen_test
async def test_the_byte_cap_counts_the_message_that_would_exceed_it():
    message = durable(1, size=100)
    cap = 2 * len(message.text)
    hub = Hub(no_replay, client_queue=1000, client_queue_bytes=cap)
    client = await attached(hub, PendingClient())
    hub.publish(message)
    hub.publish(durable(2, size=100))  # exactly at the cap: still kept
    assert client.pending_bytes == cap and client.closed_with is None
    hub.publish(durable(3))
    assert client.closed_with[0] == 4008 and hub.slow_closed == 1


@pytest.mark.gen_test
async def test_pending_counters_return_to_zero_once_flushed():
    hub = Hub(no_replay)
    client = await attached(hub, PendingClient())
    hub.publish(durable(1, size=10))
    hub.publish(Message("quota_change", {"x": 1}, seq=2))
    assert client.pending == 2 and client.pending_durable == 2 and client.pending_bytes > 0
    await client.flush(1)
    assert client.pending == 1 and client.pending_durable == 1
    await client.flush()
    assert (client.pending, client.pending_durable, client.pending_bytes) == (0, 0, 0)
    assert client.last_seq == 2


@pytest.mark.gen_test
async def test_a_write_that_raises_detaches_the_client_and_others_still_get_the_message():
    hub = Hub(no_replay)
    healthy = await attached(hub, PendingClient())
    broken = PendingClient()
    hub.register(broken)
    broken.backlog = None  # attached, then its socket went away
    broken.raises = OSError("broken pipe")
    hub.publish(durable(1))
    assert broken.closed and broken not in hub.clients
    assert broken.closed_with is None  # the transport's on_close handles the rest
    assert [m.seq for m in healthy.sent] == [1]
    hub.publish(durable(2))  # a detached client is skipped, not written to again
    assert broken.sent == []


@pytest.mark.gen_test
async def test_replay_failed_when_the_event_log_raises_and_live_events_still_flow():
    async def broken_log(after, limit):
        raise OSError("database is locked")

    hub = Hub(broken_log, ring_size=0)
    hub.last_seq = 10
    client = PendingClient()
    await hub.attach(client, "4")
    recovered = [m for m in client.sent if m.type == "recovered"]
    assert [m.data for m in recovered] == [
        {"recovered": False, "missed": None, "seq": 10, "reason": "replay_failed"}
    ]
    assert client.last_seq == 10
    await client.flush()
    hub.publish(durable(11))
    assert client.kinds()[-1] == ("violation", 11)


@pytest.mark.gen_test
async def test_a_replay_that_fails_is_logged_as_such(caplog):
    async def broken_log(after, limit):
        raise OSError("database is locked")

    hub = Hub(broken_log, ring_size=0)
    hub.last_seq = 10
    await hub.attach(PendingClient(), "4")
    (record,) = [r for r in caplog.records if r.name == "quotaserver.realtime.hub"]
    assert record.getMessage() == "replay from the event log failed"
    assert "database is locked" in str(record.exc_info[1])


@pytest.mark.gen_test
async def test_in_a_cluster_a_failed_catch_up_is_replay_failed_and_logged(caplog):
    """A cluster instance syncs with the event log before it answers a cursor: when that
    read fails the client hears replay_failed (at the head it knew), nothing is skipped."""
    calls = []

    async def broken_log(after, limit):
        calls.append(after)
        raise OSError("database is locked")

    hub = Hub(broken_log, ring_size=100)
    hub.sync_on_recover = True
    hub.last_seq = 10
    client = PendingClient()
    await hub.attach(client, "10")
    assert calls == [10]
    assert client.sent[-1].data == {
        "recovered": False, "missed": None, "seq": 10, "reason": "replay_failed",
    }  # fmt: skip
    assert client.last_seq == 10
    messages = [r.getMessage() for r in caplog.records if r.name == "quotaserver.realtime.hub"]
    assert messages == ["catching up with the event log failed"]


@pytest.mark.gen_test
async def test_in_a_cluster_a_cursor_at_the_head_after_the_catch_up_recovers_nothing():
    async def log_to_12(after, limit):
        return [durable(s) for s in range(after + 1, 13)][:limit]

    hub = Hub(log_to_12, ring_size=100)
    hub.sync_on_recover = True
    hub.last_seq = 10
    at_head = PendingClient()
    await hub.attach(at_head, "12")  # ahead of this instance, the log's head after the sync
    assert at_head.sent[-1].data == {"recovered": True, "missed": 0, "seq": 12}
    ahead = PendingClient()
    await hub.attach(ahead, "13")
    assert ahead.sent[-1].data == {
        "recovered": False, "missed": None, "seq": 12, "reason": "unknown_cursor",
    }  # fmt: skip


@pytest.mark.gen_test
async def test_a_gap_free_ring_answers_without_the_log():
    asked = []

    async def log_source(after, limit):
        asked.append(after)
        return [durable(s) for s in range(after + 1, 21)][:limit]

    hub = Hub(log_source, ring_size=100)
    hub.last_seq = 15
    for seq in range(16, 21):
        hub.publish(durable(seq))
    client = PendingClient()
    await hub.attach(client, "16")  # the ring holds 16..20: 17..20 missed, 16 not
    assert [m.seq for m in client.sent if m.seq] == [17, 18, 19, 20]
    assert client.sent[-1].data == {"recovered": True, "missed": 4, "seq": 20}
    assert asked == []  # a ring-only replay
    older = PendingClient()
    await hub.attach(older, "14")  # 15 is not in the ring: the log answers
    assert asked == [14]
    assert [m.seq for m in older.sent if m.seq] == [15, 16, 17, 18, 19, 20]


@pytest.mark.gen_test
async def test_a_client_closing_during_the_database_replay_gets_nothing_more():
    gate = asyncio.Event()

    async def slow_log(after, limit):
        await gate.wait()
        return [durable(s) for s in range(after + 1, 6)]

    hub = Hub(slow_log, ring_size=0)
    hub.last_seq = 5
    client = PendingClient()
    attaching = asyncio.ensure_future(hub.attach(client, "1"))
    await wait_until(lambda: client.sent, "the welcome")
    hub.publish(durable(6))  # held in the backlog
    hub.detach(client)  # the peer hung up while the query ran
    gate.set()
    await attaching
    assert client.kinds() == [("welcome", None), ("stats", None)]
    assert client not in hub.clients


@pytest.mark.gen_test
async def test_recovery_for_a_filtered_client_sends_and_counts_only_its_types():
    hub = Hub(no_replay, ring_size=10)
    for seq, type in ((1, "violation"), (2, "alert"), (3, "violation"), (4, "quota_change")):
        hub.publish(durable(seq, type))
    client = PendingClient(types=["alert"])
    await hub.attach(client, "0")
    # No stats snapshot for a client that did not subscribe to stats.
    assert client.kinds() == [("welcome", None), ("alert", 2), ("recovered", None)]
    assert client.sent[0].data["types"] == ["alert"]
    assert client.sent[-1].data == {"recovered": True, "missed": 1, "seq": 4}
    assert client.last_seq == 4  # skipped types count as seen: no replay of them later
    await client.flush()
    hub.publish(durable(5, "violation"))
    hub.publish(durable(6, "alert"))
    await client.flush()
    hub.ping()  # control types reach every client
    assert client.kinds()[3:] == [("alert", 6), ("ping", None)]


@pytest.mark.gen_test
async def test_too_many_missed_from_the_log_is_refused():
    asked = []

    async def log_source(after, limit):
        asked.append((after, limit))
        return [durable(s) for s in range(after + 1, after + 1 + limit)]

    hub = Hub(log_source, ring_size=0, replay_limit=3)
    hub.last_seq = 50
    client = PendingClient()
    await hub.attach(client, "10")
    assert asked == [(10, 4)]  # one more than the limit proves "too many"
    assert client.sent[-1].data == {
        "recovered": False, "missed": None, "seq": 50, "reason": "too_many_missed",
    }  # fmt: skip
    assert [m for m in client.sent if m.seq] == []


@pytest.mark.parametrize("ring_size", [0, 100])
@pytest.mark.gen_test
async def test_exactly_the_replay_limit_is_replayed_one_more_is_refused(ring_size):
    async def log_source(after, limit):
        return [durable(s) for s in range(after + 1, min(after + limit, 13) + 1)]

    hub = Hub(log_source, ring_size=ring_size, replay_limit=3)
    hub.last_seq = 9
    for seq in range(10, 14):  # the ring (when there is one) holds 10..13
        hub.publish(durable(seq))
    at_limit = PendingClient()
    await hub.attach(at_limit, "10")  # 11, 12, 13: exactly the limit
    assert [m.seq for m in at_limit.sent if m.seq] == [11, 12, 13]
    assert at_limit.sent[-1].data == {"recovered": True, "missed": 3, "seq": 13}
    over = PendingClient()
    await hub.attach(over, "9")  # 10..13: one more
    assert [m.seq for m in over.sent if m.seq] == []
    assert over.sent[-1].data == {
        "recovered": False, "missed": None, "seq": 13, "reason": "too_many_missed",
    }  # fmt: skip


@pytest.mark.parametrize(("cursor", "reason"), [("x", "invalid_cursor"), (None, None),
                                                ("-1", "invalid_cursor"),
                                                ("8", "unknown_cursor")])  # fmt: skip
@pytest.mark.gen_test
async def test_cursors_the_hub_refuses(cursor, reason):
    async def log_at_7(after, limit):  # a cursor ahead of the hub: the log has nothing more
        assert after == 7, "only a cursor beyond the head may ask the log"
        return []

    hub = Hub(log_at_7)
    hub.last_seq = 6
    hub.publish(durable(7))
    client = PendingClient()
    await hub.attach(client, cursor)
    recovered = [m.data for m in client.sent if m.type == "recovered"]
    if reason is None:
        assert recovered == []
    else:
        assert recovered == [{"recovered": False, "missed": None, "seq": 7, "reason": reason}]


@pytest.mark.gen_test
async def test_a_cursor_at_the_head_recovers_nothing_without_asking_the_log():
    hub = Hub(no_replay)
    hub.last_seq = 2
    hub.publish(durable(3))
    client = PendingClient()
    await hub.attach(client, "3")
    assert client.sent[-1].data == {"recovered": True, "missed": 0, "seq": 3}


@pytest.mark.gen_test
async def test_events_offered_out_of_order_enter_a_full_ring_in_order_and_bounded():
    hub = Hub(no_replay, ring_size=3)
    hub.last_seq = 9
    for seq in (10, 12, 13):  # 12 and 13 wait for 11 (the sequencer holds them)
        hub.publish(durable(seq))
    assert [m.seq for m in hub.ring] == [10] and hub.last_seq == 10
    hub.publish(durable(11))  # the late one arrives in time: all three follow, in order
    assert [m.seq for m in hub.ring] == [11, 12, 13]
    hub.publish(durable(9))  # already delivered: not again
    assert [m.seq for m in hub.ring] == [11, 12, 13]
    assert hub.last_seq == 13
    await hub.sequencer.settled()


@pytest.mark.gen_test
async def test_a_late_event_is_delivered_live_in_order_and_a_repeat_is_not():
    hub = Hub(no_replay, ring_size=3)
    hub.last_seq = 9
    client = await attached(hub, PendingClient())
    for seq in (10, 12, 13, 11, 9):
        hub.publish(durable(seq))
    assert [m.seq for m in client.sent] == [10, 11, 12, 13]
    assert client.last_seq == 13
    await hub.sequencer.settled()


@pytest.mark.gen_test
async def test_pings_and_deltas_during_a_replay_backlog_are_not_queued():
    gate = asyncio.Event()

    async def slow_log(after, limit):
        await gate.wait()
        return [durable(s) for s in range(after + 1, 4)]

    hub = Hub(slow_log, ring_size=0)
    hub.last_seq = 3
    hub.publish_stats({"commands_today": 1})
    client = PendingClient()
    attaching = asyncio.ensure_future(hub.attach(client, "0"))
    await wait_until(lambda: client.sent, "the welcome")
    hub.ping()
    hub.ping()
    hub.publish_stats({"commands_today": 2})
    fourth = durable(4)
    hub.publish(fourth)
    assert client.backlog == [fourth]  # only durable events wait for the replay
    gate.set()
    await attaching
    assert client.kinds() == [
        ("welcome", None), ("stats", None), ("violation", 1), ("violation", 2),
        ("violation", 3), ("recovered", None), ("violation", 4),
    ]  # fmt: skip
    # Still behind (nothing flushed): the skipped delta waits for the catch-up.
    assert client.stats_stale is True
    await client.flush()
    assert client.sent[-1].data == {"delta": False, "commands_today": 2}


@pytest.mark.gen_test
async def test_a_skipped_delta_during_replay_is_sent_in_full_when_the_client_is_idle():
    hub = Hub(no_replay)
    client = RecordingClient()  # flushes at once: idle at the end of attach
    hub.register(client)
    hub.publish_stats({"commands_today": 1})
    assert client.stats_stale is True and client.sent == []
    await hub.attach(client)
    assert [(m.type, m.data["delta"]) for m in client.sent if m.type == "stats"] == [
        ("stats", False),
        ("stats", False),
    ]
    assert client.stats_stale is False


def test_reap_drops_only_silent_clients_that_answer_pings():
    hub = Hub(no_replay)
    silent, alive, sse = PendingClient(), PendingClient(), RecordingClient()
    for client in (silent, alive, sse):
        hub.register(client)
        client.last_seen -= 100
    alive.seen()
    assert hub.reap(timeout=30) == 1
    assert silent.closed_with == (1001, "ping timeout")
    assert hub.clients == {alive, sse}  # SSE has no pongs: never reaped for silence


def test_counts_limits_and_close_all():
    hub = Hub(no_replay, max_connections=2)
    a, b = PendingClient(), RecordingClient()
    hub.register(a)
    assert not hub.full
    hub.register(b)
    hub.register(b)  # attach registers again: still one connection
    assert hub.full
    assert (hub.count(), hub.count("fake"), hub.count("test"), hub.count("sse")) == (2, 1, 1, 0)
    per_identity = {a.identity: 1, b.identity: 1} if a.identity != b.identity else {a.identity: 2}
    assert dict(hub.per_identity) == per_identity  # the O(1) count the handshake checks
    hub.close_all(1012, "restart")
    assert a.closed_with == (1012, "restart") and b.closed_with == 1012
    assert hub.count() == 0 and a.closed and b.closed and not hub.per_identity


def test_stats_state_caches_the_full_message_until_a_field_changes():
    hub = Hub(no_replay)
    hub.publish_stats({"a": 1})
    first = hub.stats.full_message()
    assert hub.stats.full_message() is first  # encoded once for every client
    assert hub.publish_stats({"a": 1}) is False
    assert hub.stats.full_message() is first
    hub.publish_stats({"a": 2})
    assert hub.stats.full_message() is not first
    assert hub.stats.full_message().data == {"delta": False, "a": 2}


def test_wants_filters_everything_but_control_types():
    client = RecordingClient(types=["alert"])
    assert client.wants("alert") and client.wants("welcome") and client.wants("recovered")
    assert not client.wants("violation") and not client.wants("stats")
    assert RecordingClient().wants("anything")


@pytest.mark.gen_test
async def test_a_ping_carries_the_server_time_to_every_client():
    hub = Hub(no_replay)
    watchers = [RecordingClient(), RecordingClient(types=frozenset({"alert"}))]
    for client in watchers:
        await hub.attach(client, None)
    hub.ping()
    for client in watchers:
        (ping,) = [m for m in client.sent if m.type == "ping"]
        assert list(ping.data) == ["server_time"]
        sent = datetime.fromisoformat(ping.data["server_time"].replace("Z", "+00:00"))
        assert abs((datetime.now(UTC) - sent).total_seconds()) < 60


@pytest.mark.gen_test
async def test_an_event_a_client_already_has_is_not_sent_again():
    hub = Hub(no_replay)
    client = await attached(hub, PendingClient())
    for seq in (1, 2, 3):
        hub.publish(durable(seq))
    await client.flush()
    hub.publish(durable(3))  # the same event once more (a second path delivered it too)
    hub.publish(durable(2))
    hub.publish(durable(4))
    await client.flush()
    assert [m.seq for m in client.sent if m.seq is not None] == [1, 2, 3, 4]
