"""The sequencer: durable events once each and in seq order, gaps resolved from the log."""

from __future__ import annotations

import pytest

from quotaserver.realtime.messages import Message
from quotaserver.realtime.sequencer import Sequencer


def event(seq: int) -> Message:
    return Message("violation", {"n": seq}, seq=seq)


class Log:
    """The event log as the database would answer: committed events by id."""

    def __init__(self, *seqs: int, failures: int = 0, fail_on: frozenset[int] = frozenset()):
        self.rows = {s: event(s) for s in seqs}
        self.failures = failures
        self.fail_on = fail_on  # which reads fail (0 is the first), after the first failures
        self.reads: list[tuple[int, int]] = []

    async def __call__(self, after: int, limit: int) -> list[Message]:
        self.reads.append((after, limit))
        if self.failures or len(self.reads) - 1 in self.fail_on:
            self.failures = max(0, self.failures - 1)
            raise ConnectionError("database down")
        return [self.rows[s] for s in sorted(self.rows) if s > after][:limit]


def sequencer(log: Log, head: int = 0) -> tuple[Sequencer, list[int]]:
    delivered: list[int] = []
    seq = Sequencer(lambda m: delivered.append(m.seq), log, hold=0.01)
    seq.head = head
    return seq, delivered


@pytest.mark.gen_test
async def test_in_order_events_go_out_at_once_and_repeats_are_dropped():
    seq, delivered = sequencer(Log())
    assert [seq.offer(event(s)) for s in (1, 2, 2, 1, 3)] == [True, True, False, False, True]
    assert delivered == [1, 2, 3] and seq.head == 3 and seq.pending == {}


@pytest.mark.gen_test
async def test_a_gap_filled_live_within_the_hold_needs_no_log_read():
    log = Log()
    seq, delivered = sequencer(log)
    seq.offer(event(2))  # 1 is still on its way (another instance published it)
    assert delivered == [] and 2 in seq.pending
    seq.offer(event(1))
    assert delivered == [1, 2]
    await seq.settled()
    assert log.reads == []


@pytest.mark.gen_test
async def test_a_gap_nobody_publishes_is_read_from_the_log_and_holes_are_skipped():
    # 2 committed but its notification was lost; 3 was rolled back (a hole); 4 arrived.
    log = Log(1, 2, 4)
    seq, delivered = sequencer(log, head=1)
    seq.offer(event(4))
    await seq.settled()
    assert delivered == [2, 4] and seq.head == 4
    assert log.reads == [(1, 3)] and seq.backfilled == 1


@pytest.mark.gen_test
async def test_a_read_of_one_event_skips_the_hole_before_it():
    log = Log(1, 3)  # 2 was rolled back
    seq, delivered = sequencer(log, head=1)
    seq.offer(event(3))
    await seq.settled()
    assert delivered == [3] and seq.head == 3 and seq.pending == {}
    assert log.reads == [(1, 2)] and seq.backfilled == 0  # 3 came live


@pytest.mark.gen_test
async def test_backfilled_counts_every_event_only_the_log_brought():
    log = Log(1, 2, 3, 5)
    seq, delivered = sequencer(log, head=1)
    seq.offer(event(5))  # 2 and 3 lost on the way
    await seq.settled()
    assert delivered == [2, 3, 5] and seq.backfilled == 2
    log.rows.update({s: event(s) for s in (6, 7, 8)})
    seq.offer(event(8))  # 6 and 7 lost too
    await seq.settled()
    assert delivered == [2, 3, 5, 6, 7, 8] and seq.backfilled == 4


def recorded(log: Log, batch: int = 1000) -> tuple[Sequencer, list[int], list[float]]:
    """A sequencer whose hold and back-off sleeps are recorded and return at once."""
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)

    delivered: list[int] = []
    seq = Sequencer(lambda m: delivered.append(m.seq), log, hold=0.01, batch=batch, sleep=sleep)
    return seq, delivered, delays


@pytest.mark.gen_test
async def test_while_the_log_cannot_be_read_the_gap_is_held_never_skipped(caplog):
    log = Log(5, 6, 7, failures=7)
    seq, delivered, delays = recorded(log)
    seq.head = 5
    seq.offer(event(7))
    await seq.settled()  # seven failed reads, then the eighth answers
    assert delivered == [6, 7]
    assert len(log.reads) == 8
    # The hold, then a back-off that doubles up to 5 s.
    assert delays == [0.01, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0]
    warnings = [r for r in caplog.records if r.name == "quotaserver.realtime.sequencer"]
    assert [r.getMessage() for r in warnings] == [
        "cannot read the event log to fill a gap; retrying"
    ] * 7
    assert all(r.exc_info and isinstance(r.exc_info[1], ConnectionError) for r in warnings)


@pytest.mark.gen_test
async def test_a_read_that_succeeds_restarts_the_back_off():
    # One event per read: 6, then a failure, then 7, then a failure, then 8.
    log = Log(5, 6, 7, 8, fail_on=frozenset({1, 3}))
    seq, delivered, delays = recorded(log, batch=1)
    seq.head = 5
    seq.offer(event(9))
    log.rows[9] = event(9)
    await seq.settled()
    assert delivered == [6, 7, 8, 9]
    assert delays == [0.01, 0.1, 0.1]  # each failure after a success waits the first step


@pytest.mark.gen_test
async def test_sync_delivers_everything_beyond_the_head_in_batches():
    log = Log(*range(1, 2501))
    seq, delivered = sequencer(log)
    seq.batch = 1000
    await seq.sync()
    assert delivered == list(range(1, 2501)) and seq.head == 2500
    assert [after for after, _ in log.reads] == [0, 1000, 2000]


@pytest.mark.gen_test
async def test_after_stop_late_arrivals_are_held_not_resolved():
    log = Log(1, 2, 3)
    seq, delivered = sequencer(log)
    await seq.stop()
    seq.offer(event(3))
    await seq.settled()  # a resolver, had one started, would have read the log by now
    assert delivered == [] and log.reads == [] and 3 in seq.pending
