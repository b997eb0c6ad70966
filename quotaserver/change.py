"""Persist, then publish: the one shape every writer returns, and the one place that
publishes it after COMMIT.

A writer's database work (run on a worker thread, inside one transaction) returns a
:class:`Change`: the ``payload`` the caller gets back and the durable ``events`` it wrote
to the event log in the same transaction. :func:`commit` runs that work through the
store and, only once it has committed, hands the events to ``publish`` (``QuotaApp.publish``:
hub, backplane, metrics, plugin hooks). Work that raises or rolls back publishes nothing; a
committed change is published even if the awaiting caller was cancelled meanwhile.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from .realtime.messages import Message

if TYPE_CHECKING:
    from .db import Store

T = TypeVar("T")
Publish = Callable[[list[Message]], None]


@dataclass(slots=True)
class Change(Generic[T]):
    """What a write produced: the caller's ``payload`` and the events to publish."""

    payload: T
    events: list[Message] = field(default_factory=list)


async def commit(
    store: Store,
    work: Callable[[], Change[T]],
    publish: Publish,
    then: Callable[[Change[T]], Any] | None = None,
) -> T:
    """Run ``work`` on the store; after its COMMIT publish its events (then call ``then``,
    e.g. a decision's plugin hooks); return its payload."""

    def committed(change: Change[T]) -> None:
        if change.events:
            publish(change.events)
        if then is not None:
            then(change)

    change = await store.run_committed(work, committed)
    return change.payload
