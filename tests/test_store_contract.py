"""What every queue store keeps, run against both: the SQLite file and PostgreSQL. The
delivery core (dispatcher and workers) runs on each, and the PostgreSQL-only duties (leases that
run out, routers that lease side by side) are tested on their own."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest

from router.current import Current
from router.deadletters import Selection, dead_letters, replay
from router.delivery import Dispatcher
from router.errors import RetryableError
from router.events import Event, new_event_id, utc_timestamp
from router.routing import Routes
from router.sinks import BaseSink
from router.sinks.webhook import WebhookTarget
from router.store import NewDelivery, QueueStore, SqliteStore
from router.store.pg_schema import MIGRATIONS, SCHEMA_VERSION
from router.store.postgres import PostgresStore
from router.store.sqlite_writer import MAX_ROWS_PER_TRANSACTION

TARGET = "webhook:global"
OpenStore = Callable[..., Awaitable[QueueStore]]


def event(chat: str = "c1", event_id: str | None = None) -> Event:
    return Event(
        event_id or new_event_id(), "bot", "messages.upsert", b"{}", utc_timestamp(), chat=chat,
        id_from_source=event_id is not None,
    )  # fmt: skip


@pytest.fixture
async def open_store(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[OpenStore]:
    """Opens a store (again: a restart) of this test's backend, running; closes them all after."""
    running: list[tuple[QueueStore, asyncio.Task[None]]] = []
    url = request.getfixturevalue("pg_url") if backend == "postgres" else None

    async def open_(node: str = "node-a", lease_timeout_s: float = 30.0) -> QueueStore:
        store: QueueStore
        if url is None:
            store = await SqliteStore.open(tmp_path / "router.db")
        else:
            store = await PostgresStore.open(url, node, lease_timeout_s=lease_timeout_s)
        running.append((store, asyncio.create_task(store.run())))
        return store

    yield open_
    for store, task in running:
        await stop(store, task)


async def stop(store: QueueStore, task: asyncio.Task[None]) -> None:
    if not task.done():
        await store.close()
        await task
        store.shutdown()


def where(store: QueueStore) -> Path | str:
    return store.url if isinstance(store, PostgresStore) else store.path  # type: ignore[attr-defined]


async def test_accepted_leased_acked_and_gone(open_store):
    store = await open_store()
    accepted = await store.accept([NewDelivery(event(), (TARGET,), ("bot\nc1",))])
    assert accepted.duplicates == set()
    [lease] = await store.lease(TARGET, 10)
    assert lease.okey == "bot\nc1" and lease.attempts == 0
    assert await store.lease(TARGET, 10) == []  # leased once, to one worker
    assert (await store.counts())["pending"] == 1
    await store.ack(lease)
    assert await store.counts() == {"pending": 0, "dead": 0}
    assert await store.due_or_leased() == 0


async def test_a_large_batch_handed_over_is_stored_as_handed_over(open_store):
    """250 events (more than one INSERT statement writes), handed over to one target and stored
    pending for another: each handed-over lease names its own stored row, and the other target
    reads them all back, in order, with their data. (PostgreSQL hands nothing over: with
    several routers every delivery goes through the queue, so its leases are read back.)"""
    store, other = await open_store(), "webhook:instance:bot"
    events = [
        Event(new_event_id(), "bot", "messages.upsert", b'{"n":%d}' % n, utc_timestamp(), chat=f"c{n}")
        for n in range(250)
    ]
    accepted = await store.accept(
        [NewDelivery(e, (TARGET, other), (f"bot\nc{n}", None)) for n, e in enumerate(events)],
        leased_targets=frozenset({TARGET}),
    )
    handed = accepted.leases if isinstance(store, SqliteStore) else await store.lease(TARGET, 500)
    assert [lease.event for lease in handed] == events
    assert [lease.okey for lease in handed] == [f"bot\nc{n}" for n in range(250)]
    assert await store.lease(TARGET, 500) == [], "handed over: leased already"
    retried = handed[117]
    await store.retry(retried, time.time() - 1, "HTTP 500")
    await asyncio.gather(*(store.ack(lease) for lease in handed if lease is not retried))
    [again] = await store.lease(TARGET, 500)
    assert (again.delivery_id, again.event, again.attempts) == (retried.delivery_id, events[117], 1)
    pending = await store.lease(other, 500)
    assert [lease.event for lease in pending] == events
    assert len({lease.delivery_id for lease in [*pending, *handed]}) == 500


async def test_a_retry_keeps_its_due_time_and_its_error(open_store):
    store = await open_store()
    await store.accept([NewDelivery(event(), (TARGET,))])
    [lease] = await store.lease(TARGET, 10)
    due = time.time() + 60
    await store.retry(lease, due, "HTTP 500")
    assert await store.lease(TARGET, 10) == []
    assert abs((await store.next_due(TARGET) or 0) - due) < 0.01
    [again] = await store.lease(TARGET, 10, now=due + 1)
    assert again.delivery_id == lease.delivery_id and again.attempts == 1
    await store.kill(again, "HTTP 400")
    [dead] = dead_letters(where(store))
    assert dead["id"] == lease.delivery_id and dead["last_error"] == "HTTP 400" and dead["attempts"] == 2
    assert replay(where(store), Selection(ids=(dead["id"],))) == 1
    [replayed] = await store.lease(TARGET, 10)
    assert replayed.attempts == 0


async def test_an_id_sent_twice_is_stored_once_and_the_checkpoint_goes_with_it(open_store):
    store = await open_store()
    first = await store.accept([NewDelivery(event(event_id="src-1"), (TARGET,))], checkpoint=("jsonl", "10"))
    second = await store.accept([NewDelivery(event(event_id="src-1"), (TARGET,))], checkpoint=("jsonl", "20"))
    assert first.duplicates == set() and second.duplicates == {"src-1"}
    assert (await store.counts())["pending"] == 1
    assert await store.checkpoint("jsonl") == "20"


async def test_a_lease_does_not_wait_behind_events_being_accepted(tmp_path):
    """SQLite: leases and acks go in a transaction of their own ahead of queued accepts (which
    sync to disk), and an accepting transaction holds a bounded number of deliveries."""
    store = await SqliteStore.open(tmp_path / "router.db")
    runner = asyncio.create_task(store.run())
    try:
        await store.accept([NewDelivery(event(), (TARGET,))])
        big = [NewDelivery(event(chat=f"c{n}"), (TARGET,)) for n in range(MAX_ROWS_PER_TRANSACTION)]
        accepting = asyncio.ensure_future(store.accept(big))
        also = asyncio.ensure_future(store.accept([NewDelivery(event(), (TARGET,))]))
        leasing = asyncio.ensure_future(store.lease(TARGET, 10))  # queued after both accepts
        done, _ = await asyncio.wait({accepting, also, leasing}, return_when=asyncio.FIRST_COMPLETED)
        assert done == {leasing}
        assert len(leasing.result()) == 1  # what was stored before; the rest is not written yet
        before = store.transactions
        await asyncio.gather(accepting, also)
        assert store.transactions == before + 2  # one batch filled a transaction
        assert len(await store.lease(TARGET, 2 * MAX_ROWS_PER_TRANSACTION)) == MAX_ROWS_PER_TRANSACTION + 1
    finally:
        await stop(store, runner)


async def test_leases_under_way_are_pending_again_after_a_restart(open_store):
    store = await open_store()
    await store.accept([NewDelivery(event(chat=f"c{n}"), (TARGET,), (f"bot\nc{n}",)) for n in range(3)])
    assert len(await store.lease(TARGET, 10)) == 3
    await store.close()  # the process ends with its attempts under way
    reopened = await open_store()
    assert len(await reopened.lease(TARGET, 10)) == 3


class RecordingSink(BaseSink):
    """Fails at random; records what it was given, in the order attempts started."""

    name = "webhook"

    def __init__(self) -> None:
        self.started: list[str] = []
        self.delivered: list[str] = []
        self.in_flight: dict[str, int] = {}
        self.overlap = False

    async def send(self, target: object, event: Event) -> int | None:
        chat = event.chat or ""
        self.in_flight[chat] = self.in_flight.get(chat, 0) + 1
        self.overlap |= self.in_flight[chat] > 1
        try:
            await asyncio.sleep(random.random() / 500)
            if random.random() < 0.2:
                raise RetryableError("HTTP 500")
            self.delivered.append(event.id)
            return 200
        finally:
            self.in_flight[chat] -= 1


async def test_the_delivery_core_keeps_each_chat_in_order_through_failures(open_store, make_settings):
    settings = make_settings(
        WEBHOOK_RETRY_INITIAL_DELAY_SECONDS="0.01",
        WEBHOOK_RETRY_MAX_ATTEMPTS="50",
        ROUTER_WEBHOOK_CONCURRENCY="8",
    )
    store = await open_store()
    target = WebhookTarget(TARGET, None, "http://127.0.0.1:9/x", False, events=frozenset({"messages.upsert"}))
    sink = RecordingSink()
    dispatcher = Dispatcher(store, {"webhook": sink}, Current(Routes(targets={TARGET: target})), settings)
    running = asyncio.create_task(dispatcher.run(grace_s=1))
    events = [event(chat=f"c{n % 5}") for n in range(60)]
    try:
        for start in range(0, 60, 7):
            chunk = events[start : start + 7]
            await store.accept([NewDelivery(e, (TARGET,), (f"bot\n{e.chat}",)) for e in chunk])
            dispatcher.notify([TARGET])
        async with asyncio.timeout(30):
            while len(sink.delivered) < 60:
                await asyncio.sleep(0.02)
    finally:
        dispatcher.stop()
        await running
    assert sorted(sink.delivered) == sorted(e.id for e in events)  # each once
    for chat in {e.chat for e in events}:
        sent = [e.id for e in events if e.chat == chat]
        assert [i for i in sink.delivered if i in set(sent)] == sent, chat
    assert not sink.overlap, "two deliveries of one chat were attempted at once"


# --- PostgreSQL: several routers on one queue ----------------------------------------------


@pytest.mark.parametrize("backend", ["postgres"])
async def test_routers_lease_side_by_side_without_sharing_a_delivery(open_store, backend):
    a, b = await open_store("node-a"), await open_store("node-b")
    await a.accept([NewDelivery(event(chat=None), (TARGET,)) for _ in range(200)])  # no key: all leasable
    got = await asyncio.gather(*(store.lease(TARGET, 30) for store in (a, b) for _ in range(5)))
    ids = [lease.delivery_id for leases in got for lease in leases]
    assert len(ids) == 200 and len(set(ids)) == 200


@pytest.mark.parametrize("backend", ["postgres"])
async def test_one_key_is_leased_by_one_router_at_a_time(open_store, backend):
    a, b = await open_store("node-a"), await open_store("node-b")
    await a.accept([NewDelivery(event(), (TARGET,), ("bot\nc1",)) for _ in range(3)])
    [first] = await a.lease(TARGET, 10)
    assert await b.lease(TARGET, 10) == []  # the key's next waits for the first, on any router
    await a.ack(first)
    [second] = await b.lease(TARGET, 10)
    assert second.delivery_id > first.delivery_id


@pytest.mark.parametrize("backend", ["postgres"])
async def test_a_dead_routers_leases_are_taken_over_when_they_run_out(open_store, backend):
    a = await open_store("node-a", lease_timeout_s=1.0)
    b = await open_store("node-b", lease_timeout_s=1.0)
    await a.accept([NewDelivery(event(chat=f"c{n}"), (TARGET,), (f"bot\nc{n}",)) for n in range(4)])
    assert len(await a.lease(TARGET, 10)) == 4
    a.shutdown()  # node-a dies: its connections go, nobody renews its leases
    assert await b.lease(TARGET, 10) == []
    async with asyncio.timeout(10):
        while not (taken := await b.lease(TARGET, 10)):
            await asyncio.sleep(0.1)
    assert sorted(lease.okey or "" for lease in taken) == [f"bot\nc{n}" for n in range(4)]


@pytest.mark.parametrize("backend", ["postgres"])
async def test_a_database_an_older_router_made_is_upgraded(backend, pg_url):
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(
            "CREATE TABLE router_schema (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)"
        )
        await conn.execute(MIGRATIONS[0])  # what the first release made
        await conn.execute("INSERT INTO router_schema VALUES (1, now())")
        await conn.execute(
            "INSERT INTO events VALUES ('e1', 'bot', 'call', '\\x7b7d', '2026-01-01T00:00:00.000Z',"
            " NULL, NULL, NULL, 1, NULL)"
        )
        await conn.execute(
            "INSERT INTO deliveries (event_id, target, due_at, updated_at) VALUES ('e1', $1, 0, 0)", TARGET
        )
    finally:
        await conn.close()
    store = await PostgresStore.open(pg_url, "node-a")
    task = asyncio.create_task(store.run())
    try:
        [lease] = await store.lease(TARGET, 10)  # what the older router queued goes out
        assert lease.event.id == "e1"
    finally:
        await stop(store, task)
    conn = await asyncpg.connect(pg_url)
    try:
        versions = [row[0] for row in await conn.fetch("SELECT version FROM router_schema ORDER BY version")]
    finally:
        await conn.close()
    assert versions == list(range(1, SCHEMA_VERSION + 1))


@pytest.mark.parametrize("backend", ["postgres"])
async def test_what_one_router_stores_wakes_the_others_by_notification(open_store, backend):
    """Leases renewed every 10 s here, so only the NOTIFY of the accepting transaction can
    bring the other router the news within the wait below."""
    a, b = await open_store("node-a"), await open_store("node-b")
    woken: list[str | None] = []
    b.subscribe(woken.append)
    async with asyncio.timeout(5):
        while not b.listening:
            await asyncio.sleep(0.01)
    await a.accept([NewDelivery(event(), (TARGET,), ("bot\nc1",))])
    async with asyncio.timeout(5):
        while TARGET not in woken:
            await asyncio.sleep(0.01)
    [lease] = await b.lease(TARGET, 10)
    assert lease.okey == "bot\nc1"
