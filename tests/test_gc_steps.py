"""GcSteps keeps long-lived connection objects out of full collections (real gc)."""

from __future__ import annotations

import gc
import weakref

import pytest

from quotaserver.realtime.gc_steps import GcSteps


class Connection:
    """Stands for a connection's objects: a reference cycle, as handlers and streams have."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()  # leave nothing frozen for the rest of the suite


def oldest_generation_ids() -> set[int]:
    return {id(o) for o in gc.get_objects(generation=2)}


def test_connections_leave_the_oldest_generation_in_steps_and_closed_ones_are_reclaimed(
    unfrozen,
):
    live = [0]
    steps = GcSteps(lambda: live[0], min_step=10)
    connections = [Connection() for _ in range(20)]
    gc.collect()  # survivors reach the oldest generation, which a full collection walks
    assert id(connections[0]) in oldest_generation_ids()

    live[0] = 5  # below a step: nothing happens
    steps.tick()
    assert steps.freezes == 0 and id(connections[0]) in oldest_generation_ids()

    live[0] = 20  # a step: everything alive now is frozen, skipped by full collections
    steps.tick()
    assert steps.freezes == 1 and gc.get_freeze_count() > 0
    assert id(connections[0]) not in oldest_generation_ids()

    # Closed connections in cycles are not reclaimed while frozen...
    gone = weakref.ref(connections[-1])
    del connections[10:]
    gc.collect()
    assert gone() is not None
    # ...until connections fall by a quarter: one thaw and collection, then a new freeze.
    live[0] = 10
    steps.tick()
    assert steps.thaws == 1 and gone() is None
    assert id(connections[0]) not in oldest_generation_ids()  # the survivors frozen again
