"""What every queue store is: the records it hands out and the interface the delivery core uses.

Two implementations: ``SqliteStore`` (one file, one machine; the default) and ``PostgresStore``
(one database shared by any number of routers, ``ROUTER_DATABASE_URL``). Both keep the same
guarantees: an accepted event is committed before intake answers, a delivery leaves the queue
only when delivered or purged, and the deliveries of one ordering key go one at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from router.events import Event

PENDING, LEASED, DEAD, PARKED = 0, 1, 2, 3  # parked: read, waiting for its key (``park``)

EVENT_COLUMNS = "id, instance, event, data, date_time, sender, server_url, apikey, chat"
Wake = Callable[[str | None], None]  # deliveries of this target (None: of any) became due elsewhere


@dataclass(slots=True, unsafe_hash=True)  # not frozen: made per event (see router.events.Event)
class Lease:
    """One leased delivery: the caller owns it until it acks, retries or kills it."""

    delivery_id: int
    target: str
    attempts: int  # attempts made before this one
    event: Event
    accepted_at: float  # when intake stored the event (unix seconds)
    okey: str | None = None  # its ordering key (router.ordering): None, no order to keep
    # Handed over by intake, never attempted, and its event's only delivery: acked, it takes its
    # event with it without looking for other deliveries or for attempt errors (SQLite).
    sole: bool = field(default=False, compare=False)


@dataclass(slots=True, unsafe_hash=True)  # not frozen: made per event (see router.events.Event)
class NewDelivery:
    event: Event
    targets: tuple[str, ...]
    keys: tuple[str | None, ...] = ()  # the ordering key of each target's delivery (none: all None)


@dataclass(frozen=True, slots=True)
class Accepted:
    """What ``accept`` stored: ids it already had, and the deliveries it stored leased."""

    duplicates: set[str]
    leases: list[Lease]


class QueueStore(Protocol):
    """The durable queue, as intake, the dispatcher, the workers and the health checks use it."""

    @property
    def full(self) -> bool:
        """The last write failed for lack of space."""

    @property
    def transactions(self) -> int:
        """Transactions committed so far."""

    where: str  # what it is, for logs and /ready: a path, or a database URL without password

    async def run(self) -> None: ...
    async def close(self) -> None: ...
    def shutdown(self) -> None: ...
    def subscribe(self, wake: Wake) -> None:
        """Be told when deliveries become due through another process or router."""

    async def accept(
        self,
        batch: Sequence[NewDelivery],
        checkpoint: tuple[str, str] | None = None,
        leased_targets: frozenset[str] = frozenset(),
    ) -> Accepted: ...
    async def lease(
        self, target: str, limit: int, now: float | None = None, exclusive: bool = False
    ) -> list[Lease]:
        """Up to ``limit`` due deliveries of ``target``, oldest first. ``exclusive``: the target
        has one attempt at a time (concurrency 1), on every router sharing the store."""

    def ack(self, lease: Lease) -> asyncio.Future[None]: ...
    def retry(self, lease: Lease, due_at: float, error: str) -> asyncio.Future[None]: ...
    def kill(self, lease: Lease, error: str) -> asyncio.Future[None]: ...
    def hold(self, leases: Sequence[Lease], until: float) -> asyncio.Future[None]: ...
    def park(self, leases: Sequence[Lease]) -> asyncio.Future[None]: ...
    def unpark(self, target: str, key: str, limit: int) -> asyncio.Future[int | None]: ...
    async def kill_target(self, target: str, error: str) -> int: ...
    async def next_due(self, target: str) -> float | None: ...
    async def changed_elsewhere(self) -> bool: ...
    async def pending_targets(self) -> set[str]: ...
    async def checkpoint(self, source: str) -> str | None: ...
    async def probe(self) -> None: ...
    async def sink_state(self) -> dict[str, tuple[int, int, float | None]]: ...
    async def due_or_leased(self, now: float | None = None) -> int: ...
    async def counts(self) -> dict[str, int]: ...


def event_from_row(row: Sequence[Any]) -> Event:
    """An Event from the values of ``EVENT_COLUMNS`` (positional: this runs for every lease)."""
    return Event(row[0], row[1], row[2], bytes(row[3]), row[4], row[5], row[6], row[7], row[8])


def event_row(e: Event, accepted_at: float) -> tuple[Any, ...]:
    """The values of ``EVENT_COLUMNS`` and ``accepted_at``."""
    return (
        *(e.id, e.instance, e.event, e.data, e.date_time),
        *(e.sender, e.server_url, e.apikey, e.chat, accepted_at),
    )


SinkState = dict[str, tuple[int, int, float | None]]


def sink_state_of(rows: Iterable[Sequence[Any]], now: float) -> SinkState:
    """Rows of (sink, is dead, count, oldest accepted_at) folded into ``Store.sink_state``'s
    answer: sink -> (waiting or in flight, dead letters, age of the oldest waiting)."""
    state: SinkState = {}
    for sink, dead, count, oldest in rows:
        waiting, dead_count, age = state.get(sink, (0, 0, None))
        if dead:
            dead_count = count
        else:
            waiting, age = count, max(0.0, now - oldest)
        state[sink] = (waiting, dead_count, age)
    return state


def counts_of(by_state: Mapping[int, int]) -> dict[str, int]:
    """Deliveries by state folded into ``Store.counts``' answer (in flight and parked count as pending)."""
    return {
        "pending": by_state.get(PENDING, 0) + by_state.get(LEASED, 0) + by_state.get(PARKED, 0),
        "dead": by_state.get(DEAD, 0),
    }
