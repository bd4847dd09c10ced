"""The durable queue on its own: what it keeps, what it gives back, and older files upgraded."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from router.events import Event, new_event_id, utc_timestamp
from router.store import NewDelivery, Store
from router.store.sqlite_writer import Writer


def event(data: bytes = b"{}", event_id: str | None = None) -> Event:
    return Event(
        event_id or new_event_id(), "bot", "call", data, utc_timestamp(), id_from_source=event_id is not None
    )


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(tmp_path / "router.db", dedup_window_s=1.0)
    task = asyncio.create_task(opened.run())
    yield opened
    await opened.close()
    await task
    opened.shutdown()


def rows(path: Path, query: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(query).fetchall()


async def test_an_attempts_errors_go_with_its_delivery_and_ids_never_repeat(store, tmp_path):
    await store.accept([NewDelivery(event(), ("webhook:global",))])
    [lease] = await store.lease("webhook:global", 10)
    await store.retry(lease, time.time(), "HTTP 500")
    [lease] = await store.lease("webhook:global", 10)
    store.ack(lease)
    assert (await store.counts())["pending"] == 0
    assert rows(tmp_path / "router.db", "SELECT COUNT(*) FROM attempt_errors") == [(0,)]
    # The queue is empty; the next delivery still gets a new id, so no dead letter can show
    # another delivery's errors.
    await store.accept([NewDelivery(event(), ("webhook:global",))])
    [again] = await store.lease("webhook:global", 10)
    assert again.delivery_id > lease.delivery_id


async def test_an_event_goes_with_its_last_delivery_whether_handed_over_or_leased(store, tmp_path):
    """Handed over by intake: an event with one target goes with that delivery's ack; one with
    two stays until the other is acked too, handed over or read back from the store."""
    path, hook, queue = tmp_path / "router.db", "webhook:global", "rabbitmq:global"
    alone, shared = event(), event()
    accepted = await store.accept(
        [NewDelivery(alone, (hook,)), NewDelivery(shared, (hook, queue))], None, frozenset({hook})
    )
    assert [lease.event for lease in accepted.leases] == [alone, shared]
    await asyncio.gather(*(store.ack(lease) for lease in accepted.leases))
    assert rows(path, "SELECT id FROM events") == [(shared.id,)], "the shared one waits for its queue"
    [lease] = await store.lease(queue, 10)
    await store.ack(lease)
    assert rows(path, "SELECT COUNT(*) FROM events") == [(0,)]
    assert (await store.counts())["pending"] == 0


async def test_a_drained_backlog_gives_its_space_back(store, tmp_path):
    path = tmp_path / "router.db"
    batch = [NewDelivery(event(b'"' + b"x" * 4000 + b'"'), ("webhook:global",)) for _ in range(3000)]
    await store.accept(batch)
    full = int(rows(path, "PRAGMA page_count")[0][0])
    while leases := await store.lease("webhook:global", 1000):
        for lease in leases:
            store.ack(lease)
    assert (await store.counts())["pending"] == 0
    async with asyncio.timeout(30):  # a few steps, between transactions
        while int(rows(path, "PRAGMA page_count")[0][0]) > full // 4:
            await store.probe()  # the writer runs, as it would with traffic
            await asyncio.sleep(0.2)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert path.stat().st_size < full * 4096 // 4


async def test_an_idle_store_gives_its_space_back_with_nothing_more_to_write(store, tmp_path):
    """Once a backlog is drained and nothing else comes, the store still gives pages back, a
    step every few seconds, on its own."""
    path = tmp_path / "router.db"
    batch = [NewDelivery(event(b'"' + b"x" * 4000 + b'"'), ("webhook:global",)) for _ in range(2000)]
    await store.accept(batch)
    full = int(rows(path, "PRAGMA page_count")[0][0])
    leases = await store.lease("webhook:global", 2000)
    await asyncio.gather(*(store.ack(lease) for lease in leases))
    written = store.transactions
    async with asyncio.timeout(30):  # a step every 2 s, 2,048 pages each
        while int(rows(path, "PRAGMA page_count")[0][0]) > full // 4:
            await asyncio.sleep(0.2)
    assert store.transactions == written  # given back between transactions, with none written


def thread_io(tid: int) -> dict[str, int]:
    """What one thread of this process read and wrote (rchar, wchar: bytes; syscr, syscw)."""
    text = Path(f"/proc/self/task/{tid}/io").read_text()
    return {name: int(value) for name, value in (line.split(": ") for line in text.splitlines())}


async def test_a_burst_is_written_once_and_deleted_without_being_read_back(store):
    """3,000 events of 1 KB handed over, then acked 60 at a time as a sink confirms them: the
    store's thread writes them into the log about once, and their acks read nothing back and
    write little more than the changed pages (no journal file, no freed page written)."""
    tid = await store._writer.call(threading.get_native_id)
    batch = [NewDelivery(event(b'"' + b"x" * 1000 + b'"'), ("webhook:global",)) for _ in range(3000)]
    size = sum(len(item.event.data) for item in batch)
    before = thread_io(tid)
    accepted = await store.accept(batch, None, frozenset({"webhook:global"}))
    stored = thread_io(tid)
    for start in range(0, len(accepted.leases), 60):
        await asyncio.gather(*(store.ack(lease) for lease in accepted.leases[start : start + 60]))
    acked = thread_io(tid)
    assert stored["wchar"] - before["wchar"] < 2 * size
    assert acked["rchar"] - stored["rchar"] < size // 10
    assert acked["wchar"] - stored["wchar"] < 2.5 * size
    assert (await store.counts())["pending"] == 0

    def settings(conn: sqlite3.Connection) -> list[int]:
        names = ("wal_autocheckpoint", "cache_size", "secure_delete", "temp_store")
        return [conn.execute(f"PRAGMA {name}").fetchone()[0] for name in names]

    # What the README promises: a log of about 16 MiB (4,000 pages of 4 KiB) between checkpoints,
    # 16 MiB of cache, freed pages not written (FAST is 2), journals in memory (2).
    assert await store._submit(settings) == [4000, -16000, 2, 2]


async def test_acks_go_with_the_accept_queued_beside_them(store, tmp_path):
    """Acks gathered while an accept waits are written in the accept's transaction, not in one
    of their own ahead of it: one commit, and the accept's 202 waits for nothing else."""
    accepted = await store.accept(
        [NewDelivery(event(), ("webhook:global",))], None, frozenset({"webhook:global"})
    )
    before = store.transactions
    acked = store.ack(accepted.leases[0])
    await store.accept([NewDelivery(event(), ("webhook:global",))])
    await acked
    assert store.transactions == before + 1
    assert rows(tmp_path / "router.db", "SELECT COUNT(*) FROM deliveries") == [(1,)]


async def test_remembered_ids_are_pruned_after_the_window(store, tmp_path):
    await store.accept([NewDelivery(event(event_id="adapter-1"), ("webhook:global",))])
    await asyncio.sleep(1.1)  # the window is 1 s here: past it, the id is forgotten
    store._pruned_at = 0  # the next accept prunes (it does so at most once a minute)
    await store.accept([NewDelivery(event(event_id="adapter-2"), ("webhook:global",))])
    assert rows(tmp_path / "router.db", "SELECT id FROM seen_ids") == [("adapter-2",)]


OLD_SCHEMA = """
CREATE TABLE events (id TEXT PRIMARY KEY, instance TEXT NOT NULL, event TEXT NOT NULL, data BLOB NOT NULL,
    date_time TEXT NOT NULL, sender TEXT, server_url TEXT, apikey TEXT, accepted_at REAL NOT NULL);
CREATE TABLE deliveries (id INTEGER PRIMARY KEY, event_id TEXT NOT NULL, target TEXT NOT NULL,
    state INTEGER NOT NULL DEFAULT 0, due_at REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT, updated_at REAL NOT NULL);
CREATE INDEX deliveries_due ON deliveries (target, state, due_at);
CREATE INDEX deliveries_event ON deliveries (event_id);
CREATE TABLE attempt_errors (delivery_id INTEGER NOT NULL, attempt INTEGER NOT NULL, at REAL NOT NULL,
    error TEXT NOT NULL);
INSERT INTO events VALUES ('e1', 'bot', 'call', X'7B7D', '2026-01-01T00:00:00.000Z', NULL, NULL, NULL, 1);
INSERT INTO deliveries VALUES (7, 'e1', 'webhook:global', 2, 1, 3, 'HTTP 500', 1);
INSERT INTO attempt_errors VALUES (7, 3, 1, 'HTTP 500');
INSERT INTO attempt_errors VALUES (3, 1, 1, 'an error of a delivery made long ago');
"""


async def test_a_database_of_an_older_router_is_upgraded(tmp_path):
    path = tmp_path / "router.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_SCHEMA)
    store = await Store.open(path)
    task = asyncio.create_task(store.run())
    try:
        assert (await store.counts())["dead"] == 1
        await store.accept([NewDelivery(event(), ("webhook:global",))])
        [lease] = await store.lease("webhook:global", 10)
        assert lease.delivery_id > 7
    finally:
        await store.close()
        await task
        store.shutdown()
    assert rows(path, "SELECT delivery_id, error FROM attempt_errors") == [(7, "HTTP 500")]
    assert rows(path, "PRAGMA user_version") == [(3,)]
    assert rows(path, "SELECT okey FROM deliveries WHERE id = 7") == [(None,)]  # no order to keep
    assert rows(path, "PRAGMA auto_vacuum") == [(2,)]  # incremental


async def test_a_steady_stream_of_acks_does_not_keep_accepts_waiting(tmp_path):
    """The SQLite writer puts writes that need no sync (leases, acks) ahead of queued accepts,
    but not twice running: acks that keep coming while each transaction is written, as lanes
    make them, do not keep an accept waiting."""
    path = tmp_path / "writer.db"
    writer = Writer(path, lambda: None, lambda: None)
    writer.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.conn.execute("CREATE TABLE written (what TEXT)")
    loop = asyncio.get_running_loop()
    runner = asyncio.create_task(writer.run())
    acks_to_come = [50]

    def ack(conn: sqlite3.Connection) -> None:  # while it is written, the next ack is queued
        conn.execute("INSERT INTO written VALUES ('ack')")
        if acks_to_come[0]:
            acks_to_come[0] -= 1
            loop.call_soon_threadsafe(writer.submit, ack)

    def accept(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO written VALUES ('accept')")

    try:
        writer.submit(ack)
        await writer.submit(accept, durable=True)
        assert acks_to_come[0] > 0, "the acks stopped before the accept was written"
        assert writer.transactions == 2  # the first ack gone ahead, then the accept with the next
        while acks_to_come[0]:
            await writer.submit(lambda conn: None)
    finally:
        await writer.close()
        await runner
        writer.shutdown()
    assert rows(path, "SELECT COUNT(*) FROM written WHERE what = 'ack'") == [(51,)]
