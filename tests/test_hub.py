"""The broadcaster's replay/live hand-over, driven step by step with an in-process client."""

import asyncio

import pytest

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
