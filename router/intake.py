"""Intake: the one interface every session adapter feeds.

Adapters turn what they read into JSON objects shaped like upstream's webhook envelope and call
``Intake.accept_objects``; it validates them, resolves their targets from the routing index,
stores events and deliveries durably, and only then returns their ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import orjson

from router import logs
from router.current import Current
from router.errors import IntakeError
from router.events import (
    Event,
    UnknownEventError,
    new_event_id,
    normalise_timestamp,
    utc_timestamp,
    wire_name,
)
from router.instance_status import InstanceStatus
from router.instances import check_instance_name
from router.metrics import Metrics
from router.ordering import Ordering, chat_of
from router.routing import Routes
from router.settings import Settings
from router.store import Accepted, Lease, NewDelivery, QueueStore

log = logs.get_logger("router.intake")
MAX_ID_LENGTH = 128
PARSE_SLICE = 64  # events parsed between two turns of the event loop (parse_batch)
MAX_DATA_DEPTH = 254  # levels of nesting orjson writes back; deeper `data` is refused (400)


class Handoff(Protocol):
    """How intake tells the delivery side about stored deliveries (the dispatcher)."""

    def claim(self, counts: Mapping[str, int]) -> frozenset[str]:
        """Targets that take their new deliveries straight from intake (``counts`` per target)."""

    def hand_over(self, leases: Sequence[Lease], claimed: Mapping[str, int]) -> None:
        """The stored, leased deliveries of the claimed targets."""

    def notify(self, keys: Iterable[str]) -> None:
        """New deliveries for these targets are in the store."""


class NoHandoff:
    """Intake on its own: nothing claims, nobody is told."""

    def claim(self, counts: Mapping[str, int]) -> frozenset[str]:
        return frozenset()

    def hand_over(self, leases: Sequence[Lease], claimed: Mapping[str, int]) -> None:
        return None

    def notify(self, keys: Iterable[str]) -> None:
        return None


def _optional_text(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise IntakeError(f"field {key!r} must be a string")
    return value


class Intake:
    """Validates, routes and stores events; see the module docstring."""

    def __init__(
        self,
        store: QueueStore,
        settings: Settings,
        current: Current,
        *,
        status: InstanceStatus | None = None,
        handoff: Handoff | None = None,
        live: Callable[[Sequence[Event]], None] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.current = current
        self.status = status if status is not None else InstanceStatus()  # connections seen
        self.handoff: Handoff = handoff if handoff is not None else NoHandoff()
        self.live = live  # WebSocket fan-out, after commit
        self.accepted = 0
        self.metrics = metrics
        self.ordering = Ordering(settings.ordering_modes())

    @property
    def routes(self) -> Routes:
        return self.current.routes

    def parse(self, obj: Any, path_event: str | None = None) -> Event:
        """One ingested envelope -> Event; raise IntakeError naming what is wrong."""
        if not isinstance(obj, dict):
            raise IntakeError(f"expected a JSON object, got {type(obj).__name__}")
        raw_event = obj.get("event")
        if raw_event is None and path_event is None:
            raise IntakeError("missing field 'event'")
        try:
            wire = wire_name(str(raw_event)) if raw_event is not None else path_event
        except UnknownEventError:
            raise IntakeError(f"unknown event {raw_event!r}") from None
        assert wire is not None
        if path_event is not None and wire != path_event:
            raise IntakeError(f"event {raw_event!r} does not match the path's event {path_event!r}")

        instance = obj.get("instance")
        if instance is None or instance == "":
            raise IntakeError("missing field 'instance'")
        if not isinstance(instance, str):
            raise IntakeError("field 'instance' must be a string")
        routes = self.current.routes
        if instance not in routes.instances:  # (a configured name was checked as its file loaded)
            try:
                instance = check_instance_name(instance)  # NFC: "café" is one instance however typed
            except ValueError as exc:
                raise IntakeError(f"invalid instance name {instance!r}: {exc}") from None
        if (refusal := routes.refuses_instance(instance)) is not None:
            raise IntakeError(refusal)

        date_time = _optional_text(obj, "date_time")
        if date_time is None:
            date_time = utc_timestamp()
        else:
            try:
                date_time = normalise_timestamp(date_time)
            except ValueError:
                raise IntakeError(f"field 'date_time' is not an ISO-8601 time: {date_time!r}") from None

        event_id = obj.get("id")
        id_from_source = event_id is not None
        if event_id is None:
            event_id = new_event_id()
        elif not isinstance(event_id, str) or not 0 < len(event_id) <= MAX_ID_LENGTH:
            raise IntakeError(f"field 'id' must be a string of 1 to {MAX_ID_LENGTH} characters")

        apikey = None
        if self.settings.authentication_expose_in_fetch_instances:
            apikey = routes.token_of(instance) or _optional_text(obj, "apikey")
        raw_data = obj.get("data")
        try:
            data = orjson.dumps(raw_data)
        except orjson.JSONEncodeError:
            raise IntakeError(f"field 'data' is nested deeper than {MAX_DATA_DEPTH} levels") from None
        return Event(  # positional: this runs for every event (id, instance, event, data, ...)
            event_id,
            instance,
            wire,
            data,
            date_time,
            _optional_text(obj, "sender"),
            self.settings.server_url or _optional_text(obj, "server_url"),
            apikey,
            chat_of(wire, raw_data),
            id_from_source,
        )

    def parse_many(self, objects: Sequence[Any], path_event: str | None = None) -> list[Event]:
        """Parse a batch; all or nothing, with every bad item named by its index."""
        events: list[Event] = []
        problems = self._parse_into(events, objects, 0, len(objects), path_event)
        if problems:
            raise IntakeError("; ".join(problems))
        return events

    async def parse_batch(self, objects: Sequence[Any], path_event: str | None = None) -> list[Event]:
        """``parse_many``, letting the event loop run between slices of a large batch: a batch of
        500 events is several milliseconds of parsing, and deliveries under way (a broker's
        confirms, a webhook's answers) should not wait for all of it."""
        events: list[Event] = []
        problems: list[str] = []
        for start in range(0, len(objects), PARSE_SLICE):
            if start:
                await asyncio.sleep(0)
            end = min(start + PARSE_SLICE, len(objects))
            problems += self._parse_into(events, objects, start, end, path_event)
        if problems:
            raise IntakeError("; ".join(problems))
        return events

    def _parse_into(
        self, events: list[Event], objects: Sequence[Any], start: int, end: int, path_event: str | None
    ) -> list[str]:
        problems = []
        for index in range(start, end):
            try:
                events.append(self.parse(objects[index], path_event))
            except IntakeError as exc:
                problems.append(str(exc) if len(objects) == 1 else f"item {index}: {exc}")
        return problems

    async def accept(
        self, events: Sequence[Event], checkpoint: tuple[str, str] | None = None, adapter: str = "http"
    ) -> list[str]:
        """Store ``events`` with their deliveries; return their ids once they are durable."""
        batch = []
        # Most events of a batch share their targets; with 10,000 instances, few do. (Plain
        # dictionaries: a Counter's missing keys cost a method call each.)
        by_targets: dict[tuple[str, ...], int] = {}
        duplicates: set[str] = set()
        routes, ordering = self.routes, self.ordering
        for event in events:
            targets = routes.targets_for(event.instance, event.event)
            if targets:
                batch.append(NewDelivery(event, targets, ordering.keys(targets, event.instance, event.chat)))
                by_targets[targets] = by_targets.get(targets, 0) + 1
        counts: dict[str, int] = {}
        for targets, count in by_targets.items():
            for key in targets:
                counts[key] = counts.get(key, 0) + count
        if batch or checkpoint is not None:
            stored = await self._store(batch, checkpoint, counts)
            if stored.duplicates:
                log.info("intake.duplicates", count=len(stored.duplicates))
            duplicates = stored.duplicates
        fresh = [event for event in events if event.id not in duplicates] if duplicates else events
        self.status.observe(fresh)
        if self.live is not None:  # live streams get each event once, like the stored sinks
            self.live(fresh)
        self.accepted += len(events)
        if self.metrics is not None:
            self.metrics.accepted.labels(adapter).inc(len(events))
        return [event.id for event in events]

    async def _store(
        self, batch: Sequence[NewDelivery], checkpoint: tuple[str, str] | None, counts: dict[str, int]
    ) -> Accepted:
        """Store ``batch``: the targets' workers that can take their deliveries at once (caught
        up) are handed them, the others are told they have some stored (in that order, so none
        overtakes what its target has stored)."""
        claimed = self.handoff.claim(counts)
        reserved = {key: counts[key] for key in claimed}
        try:
            stored = await self.store.accept(batch, checkpoint, claimed)
        except BaseException:
            self.handoff.hand_over([], reserved)
            raise
        # After the answer: the request's 202 goes out first, the deliveries in the next turn.
        asyncio.get_running_loop().call_soon(self._hand_over, stored.leases, reserved, counts)
        return stored

    def _hand_over(
        self, leases: Sequence[Lease], claimed: Mapping[str, int], counts: Mapping[str, int]
    ) -> None:
        self.handoff.hand_over(leases, claimed)
        self.handoff.notify(key for key in counts if key not in claimed)

    async def emit(self, event: Event, targets: Sequence[str]) -> None:
        """Store an event the router makes itself (``application.startup``) for ``targets``."""
        if targets:
            keys = self.ordering.keys(tuple(targets), event.instance, event.chat)
            await self._store([NewDelivery(event, tuple(targets), keys)], None, dict.fromkeys(targets, 1))
        if self.live is not None:
            self.live([event])
