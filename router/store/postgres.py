"""The durable queue in PostgreSQL, shared by any number of routers (``ROUTER_DATABASE_URL``).

The tables are the SQLite store's (``pg_schema``). What changes with several routers:

- **Leases** name their router and last until ``lease_until``. A router renews its own every
  third of ``lease_timeout_s``; a lease not renewed (its router died) is taken over by any
  router once it has run out. A router restarted under the same name takes its own back at once.
- **Order** is kept by the lease query itself: a delivery with an ordering key is leased only
  when no earlier delivery of its target and key is waiting, leased or parked, so the deliveries
  of one key go one at a time whichever routers hold them. ``FOR UPDATE SKIP LOCKED`` lets
  routers lease side by side without waiting for each other or taking the same row.
- **Wake-ups** go by ``NOTIFY router_due`` with the target keys as payload, sent in the
  transaction that made deliveries leasable (accept, a delivered or dead head of a key, a
  replay), so every router's workers hear of them when they are committed.

Writes that end an attempt (acks, retries, dead letters) are kept: tried again until the
database takes them, as the SQLite store does on a full disk. Acks are gathered and written
together, one statement per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg

from router import logs
from router.errors import StorageFull, StoreUnavailable
from router.redact import redact_url
from router.store import pg_sql as sql
from router.store.base import (
    DEAD,
    PENDING,
    Accepted,
    Lease,
    NewDelivery,
    Wake,
    event_from_row,
    event_row,
)
from router.store.pg_schema import DATABASE_ERRORS, migrate

T = TypeVar("T")
log = logs.get_logger("router.store")
KEPT_RETRY_S = 1.0
# The database cannot be used now (down, restarting, dropped, refusing): kept writes wait for it.
UNAVAILABLE = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InvalidCatalogNameError,
    asyncpg.exceptions.ObjectNotInPrerequisiteStateError,  # "not currently accepting connections"
    asyncpg.exceptions.TooManyConnectionsError,
)


class PostgresStore:
    """The shared queue. Open with ``await PostgresStore.open(url, node=...)``; run ``run()``."""

    def __init__(self, url: str, node: str, lease_timeout_s: float, dedup_window_s: float) -> None:
        self.url = url
        self.where = redact_url(url)
        self.node = node
        self.lease_timeout_s = lease_timeout_s
        self.dedup_window_s = dedup_window_s
        self.full = False
        self.transactions = 0
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._wakes: list[Wake] = []
        self._acks: list[Lease] = []
        self._acks_written: asyncio.Future[None] | None = None
        self._flush = asyncio.Event()
        self._closing = False
        self._pruned_at = 0.0
        self._writes: set[asyncio.Task[Any]] = set()
        self._closed = False

    # --- lifecycle ------------------------------------------------------------------------

    @classmethod
    async def open(
        cls, url: str, node: str, lease_timeout_s: float = 30.0, dedup_window_s: float = 600.0
    ) -> PostgresStore:
        store = cls(url, node, lease_timeout_s, dedup_window_s)
        store._pool = await asyncpg.create_pool(url, min_size=2, max_size=10, command_timeout=60)
        async with store._pool.acquire() as conn:
            await migrate(conn)
            # This router's leases from before a restart: pending again, now.
            await conn.execute(
                "UPDATE deliveries SET state = 0, leased_by = NULL WHERE leased_by = $1 AND state IN (1, 3)",
                node,
            )
        return store

    def subscribe(self, wake: Wake) -> None:
        self._wakes.append(wake)

    @property
    def listening(self) -> bool:
        """Other routers' notifications reach this one (its listening connection is open)."""
        return self._listener is not None and not self._listener.is_closed()

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        targets: list[str | None] = [None] if payload == "*" else list(payload.split("\n"))
        for wake in self._wakes:
            for target in targets:
                wake(target)

    async def run(self) -> None:
        """Listen for other routers' notifications, renew this router's leases, wake workers
        for leases that ran out, write acks; until ``close``."""
        renew_every = max(0.2, self.lease_timeout_s / 3)
        renewed = time.monotonic()
        try:
            while not self._closing:
                await self._listen()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._flush.wait(), renew_every)
                self._flush.clear()
                await self._write_acks()
                if time.monotonic() - renewed >= renew_every:
                    renewed = time.monotonic()
                    await self._renew()
            await self._write_acks()
            if self._writes:
                await asyncio.gather(*self._writes, return_exceptions=True)
        finally:
            if self._listener is not None:
                with contextlib.suppress(Exception):
                    await self._listener.close()
            assert self._pool is not None
            self._closed = True
            await self._pool.close()

    async def _listen(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        try:
            self._listener = await asyncpg.connect(self.url)
            await self._listener.add_listener(sql.CHANNEL, self._notified)
        except DATABASE_ERRORS as exc:  # said, and tried again next round
            log.error("store.unreachable", database=self.where, error=str(exc))
            self._listener = None
            return
        self._notified(None, 0, sql.CHANNEL, "*")  # what was notified while nobody listened

    async def _renew(self) -> None:
        """Extend this router's leases; wake workers for other routers' leases that ran out."""
        now = time.time()
        try:
            async with self._connection() as conn:
                await conn.execute(
                    "UPDATE deliveries SET lease_until = $2 WHERE leased_by = $1 AND state = 1",
                    self.node,
                    now + self.lease_timeout_s,
                )
                rows = await conn.fetch(
                    "SELECT DISTINCT target FROM deliveries WHERE state = 1 AND lease_until <= $1", now
                )
        except DATABASE_ERRORS as exc:  # said, and tried again next round
            log.error("store.unreachable", database=self.where, error=str(exc))
            return
        for row in rows:
            self._notified(None, 0, sql.CHANNEL, row[0])

    async def close(self) -> None:
        self._closing = True
        self._flush.set()

    def shutdown(self) -> None:
        if self._pool is not None and not self._closed:  # ``run`` did not get to close it
            self._closed = True
            self._pool.terminate()

    @contextlib.asynccontextmanager
    async def _connection(self) -> Any:
        assert self._pool is not None, "store is closed"
        async with self._pool.acquire() as conn:
            yield conn

    async def _write(self, work: Callable[[asyncpg.Connection], Awaitable[T]], kept: bool = False) -> T:
        """Run ``work`` in a transaction. A kept write is tried again until it goes through."""
        while True:
            try:
                async with self._connection() as conn, conn.transaction():
                    result = await work(conn)
                self.transactions += 1
                self.full = False
                return result
            except asyncpg.DiskFullError as exc:
                if not self.full:
                    log.error(
                        "store.disk_full", database=self.where, hint="intake answers 503 until there is room"
                    )
                self.full = True
                if not kept or self._closing:
                    raise StorageFull(self.where) from exc
            except UNAVAILABLE as exc:
                if not kept or self._closing:
                    raise StoreUnavailable(self.where, exc) from exc
                log.error("store.unreachable", database=self.where, error=str(exc))
            await asyncio.sleep(KEPT_RETRY_S)

    def _kept(self, work: Callable[[asyncpg.Connection], Awaitable[None]]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(self._write(work, kept=True))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return task

    # --- operations -----------------------------------------------------------------------

    async def accept(
        self,
        batch: Sequence[NewDelivery],
        checkpoint: tuple[str, str] | None = None,
        leased_targets: frozenset[str] = frozenset(),
    ) -> Accepted:
        """Store events and their deliveries; committed before it returns. ``leased_targets`` is
        not used: with several routers the deliveries go through the queue, and every router's
        workers are woken by the NOTIFY this transaction sends."""
        now = time.time()
        unique = {item.event.id: item for item in reversed(batch)}
        if len(unique) != len(batch):
            batch = [item for item in batch if unique.get(item.event.id) is item]

        async def work(conn: asyncpg.Connection) -> Accepted:
            duplicates = await self._seen_before(
                conn, [i.event.id for i in batch if i.event.id_from_source], now
            )
            fresh = [item for item in batch if item.event.id not in duplicates]
            inserted = await sql.insert_events(conn, [event_row(item.event, now) for item in fresh])
            if len(inserted) != len(fresh):
                duplicates |= {item.event.id for item in fresh if item.event.id not in inserted}
            columns: tuple[list[Any], list[Any], list[Any]] = ([], [], [])
            for item in fresh:
                if item.event.id in duplicates:
                    continue
                for target, key in zip(item.targets, item.keys or (None,) * len(item.targets), strict=True):
                    columns[0].append(item.event.id)
                    columns[1].append(target)
                    columns[2].append(key)
            await sql.insert_deliveries(conn, *columns, now)
            if checkpoint is not None:
                await sql.save_checkpoint(conn, *checkpoint)
            await sql.notify(conn, columns[1])
            return Accepted(duplicates, [])

        return await self._write(work)

    async def _seen_before(self, conn: asyncpg.Connection, ids: list[str], now: float) -> set[str]:
        """Remember adapter-sent ids; return those already remembered within the window."""
        if not ids or self.dedup_window_s <= 0:
            return set()
        horizon = now - self.dedup_window_s
        if now - self._pruned_at > min(60.0, self.dedup_window_s):
            await conn.execute("DELETE FROM seen_ids WHERE at < $1", horizon)
            self._pruned_at = now
        return set(ids) - await sql.remember_ids(conn, ids, now, horizon)

    async def lease(
        self, target: str, limit: int, now: float | None = None, exclusive: bool = False
    ) -> list[Lease]:
        """Up to ``limit`` leasable deliveries of ``target``, each the first of its key. With
        ``exclusive`` (concurrency 1), one only, and none while any router holds one of the
        target's: checked and taken under the target's advisory lock, so two routers cannot
        both find the target free."""
        due = time.time() if now is None else now
        query = sql.LEASE.format(free=sql.TARGET_FREE if exclusive else "")
        args = (target, due, 1 if exclusive else limit, self.node, due + self.lease_timeout_s)
        async with self._connection() as conn:
            if exclusive:
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", target)
                    rows = await conn.fetch(query, *args)
            else:
                rows = await conn.fetch(query, *args)
        return [Lease(r[0], target, r[1], event_from_row(r[4:]), r[2], r[3]) for r in rows]

    def ack(self, lease: Lease) -> asyncio.Future[None]:
        """Delivered: gathered with other acks and deleted together; resolves once written."""
        self._acks.append(lease)
        if self._acks_written is None:
            self._acks_written = asyncio.get_running_loop().create_future()
            self._flush.set()
        return self._acks_written

    async def _write_acks(self) -> None:
        while self._acks:
            acks, self._acks = self._acks, []
            written, self._acks_written = self._acks_written, None
            ids = [lease.delivery_id for lease in acks]
            event_ids = sorted({lease.event.id for lease in acks})
            keyed = [lease.target for lease in acks if lease.okey is not None]

            async def work(conn: asyncpg.Connection, ids: list[int] = ids, events: list[str] = event_ids,
                           keyed: list[str] = keyed) -> None:  # fmt: skip
                await sql.delete_acked(conn, ids, events)
                await sql.notify(conn, keyed)  # the next of each key may go now

            try:
                await self._write(work, kept=True)
            except Exception as exc:
                log.error("store.ack_failed", error=str(exc))
                if written is not None and not written.done():
                    written.set_exception(exc)
                continue
            if written is not None and not written.done():
                written.set_result(None)

    def retry(self, lease: Lease, due_at: float, error: str) -> asyncio.Future[None]:
        """Failed, try again at ``due_at``. The later deliveries of its key wait with it: the
        lease query lets none of them go before it."""
        return self._kept(self._fail(lease, PENDING, due_at, error))

    def kill(self, lease: Lease, error: str) -> asyncio.Future[None]:
        """Failed for good: a dead letter; its key's next delivery may go."""
        return self._kept(self._fail(lease, DEAD, time.time(), error))

    def _fail(self, lease: Lease, state: int, due_at: float, error: str) -> Callable[[Any], Awaitable[None]]:
        async def work(conn: asyncpg.Connection) -> None:
            await sql.fail(conn, lease, state, due_at, error)
            # A dead letter lets its key's next go; a retry's due time is news to a worker that
            # read the store before this was written (writes here are not ordered as SQLite's).
            await sql.notify(conn, [lease.target])

        return work

    def hold(self, leases: Sequence[Lease], until: float) -> asyncio.Future[None]:
        """Give back leased deliveries not attempted: pending again, due no sooner than ``until``."""
        ids = [lease.delivery_id for lease in leases]

        async def work(conn: asyncpg.Connection) -> None:
            await sql.hold(conn, ids, until)
            await sql.notify(conn, [lease.target for lease in leases])

        return self._kept(work)

    def park(self, leases: Sequence[Lease]) -> asyncio.Future[None]:
        """Only the first of a key is ever leased here, so nothing waits in memory behind it;
        should it happen, they go back to the queue, which keeps them in order."""
        return self.hold(leases, 0.0)

    def unpark(self, target: str, key: str, limit: int) -> asyncio.Future[int | None]:
        future: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        future.set_result(None)  # nothing is parked (see ``park``)
        return future

    async def kill_target(self, target: str, error: str) -> int:
        return await self._write(lambda conn: sql.kill_target(conn, target, error))

    async def probe(self) -> None:
        await self._write(sql.probe)

    async def _read(self, query: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        async with self._connection() as conn:
            return await query(conn)

    async def next_due(self, target: str) -> float | None:
        """When the next delivery of ``target`` this router could lease falls due."""
        return await self._read(lambda conn: sql.next_due(conn, target, self.node))

    async def changed_elsewhere(self) -> bool:
        return False  # other writers notify (``subscribe``)

    async def pending_targets(self) -> set[str]:
        return await self._read(sql.pending_targets)

    async def checkpoint(self, source: str) -> str | None:
        return await self._read(lambda conn: sql.checkpoint(conn, source))

    async def sink_state(self) -> dict[str, tuple[int, int, float | None]]:
        """By sink, over the whole shared queue: (waiting or in flight, dead letters, oldest age)."""
        return await self._read(sql.sink_state)

    async def due_or_leased(self, now: float | None = None) -> int:
        due = time.time() if now is None else now
        return await self._read(lambda conn: sql.due_or_leased(conn, due))

    async def counts(self) -> dict[str, int]:
        return await self._read(sql.counts)
