"""The durable queue: an embedded SQLite database in WAL mode.

Every accepted event is a row in ``events``; every (event, target) pair a row in
``deliveries``, whose ``state`` is pending (0), leased (1, an attempt is under way), dead (2,
a dead letter with its last error) or parked (3, read by its worker and waiting for the earlier
deliveries of its ordering key, ``park``). Delivered rows are deleted at once, and an event row goes
with its last delivery, so the file stays as large as the backlog.

All access goes through one connection on one thread, written to in batches (group commit:
``sqlite_writer``). Acks, the most frequent write, are gathered into one operation.

Durability: a transaction that accepts events is committed with ``synchronous=FULL`` (on disk
before intake answers 202, power loss included). Leases, acks and retries commit with
``NORMAL``: safe against a killed process, and the next FULL commit syncs them too. Losing one
of those to a power cut only means an event is delivered again, which at-least-once allows.

Size: delivery ids are never reused (AUTOINCREMENT), and an attempt's error goes with its
delivery, so a dead letter's errors are its own. The file gives back the pages a drained backlog
freed, a few megabytes at a time between transactions (``auto_vacuum=INCREMENTAL``), never in
one long pause. The schema and the upgrades of older files are in ``sqlite_schema``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from router import logs
from router.events import Event
from router.store import sqlite_sql as sql
from router.store.base import (
    DEAD,
    EVENT_COLUMNS,
    LEASED,
    PARKED,
    PENDING,
    Accepted,
    Lease,
    NewDelivery,
    Wake,
    event_from_row,
    event_row,
)
from router.store.sqlite_schema import connect
from router.store.sqlite_writer import Queued, Writer

T = TypeVar("T")

log = logs.get_logger("router.store")


_EVENT_COLUMNS_OF_E = ", ".join(f"e.{column}" for column in EVENT_COLUMNS.split(", "))


class SqliteStore:
    """The durable queue in one file. Open with ``await SqliteStore.open(path)``; run ``run()`` as a task."""

    def __init__(self, path: Path, dedup_window_s: float = 600.0) -> None:
        self.path = path
        self.dedup_window_s = dedup_window_s  # ids sent by adapters are remembered this long
        self._writer = Writer(path, self._gathered_acks, self._unblock_due)
        self._acks: list[Lease] = []
        self._acks_written: asyncio.Future[None] | None = None  # resolves once ``_acks`` are written
        self._pruned_at = 0.0
        self._data_version: int | None = None  # PRAGMA data_version last seen (writes by others)
        # (target, ordering key) -> until when its deliveries wait behind a retry; read and
        # written on the store's thread only, rebuilt from the deliveries at open.
        self._blocked: dict[tuple[str, str], float] = {}
        self.where = str(path)

    @property
    def full(self) -> bool:
        """The last write failed for lack of disk space."""
        return self._writer.full

    @property
    def transactions(self) -> int:
        return self._writer.transactions

    # --- lifecycle ------------------------------------------------------------------------

    @classmethod
    async def open(cls, path: Path, dedup_window_s: float = 600.0) -> SqliteStore:
        store = cls(path, dedup_window_s)
        await store._writer.call(store._connect)
        return store

    def _connect(self) -> None:
        conn = connect(self.path)
        # Attempts that were under way when the process died are pending again.
        conn.execute("UPDATE deliveries SET state = ? WHERE state IN (?, ?)", (PENDING, LEASED, PARKED))
        rows = conn.execute(
            "SELECT target, okey, MAX(due_at) FROM deliveries"
            " WHERE state = ? AND okey IS NOT NULL AND due_at > ? GROUP BY target, okey",
            (PENDING, time.time()),
        )
        self._blocked = {(target, key): until for target, key, until in rows}
        self._writer.conn = conn

    async def run(self) -> None:
        """Apply queued operations, one transaction per batch, until ``close`` is called."""
        await self._writer.run()

    async def close(self) -> None:
        """Stop ``run`` once everything queued is written, then close the database."""
        await self._writer.close()

    def shutdown(self) -> None:
        """Close the connection (after ``run`` has returned)."""
        self._writer.shutdown()

    def _gathered_acks(self) -> Queued | None:
        """The acks gathered since the last transaction, as one operation to write first."""
        if not self._acks:
            return None
        acks, self._acks = self._acks, []
        written, self._acks_written = self._acks_written, None
        assert written is not None
        return Queued(sql.ack_op(acks), written, kept=True, rides=True)

    def _unblock_due(self) -> None:
        """(On the writer's thread.) Keys whose retry is due by now hold nothing back any more."""
        if self._blocked:
            now = time.time()
            self._blocked = {where: until for where, until in self._blocked.items() if until > now}

    def _submit(
        self, op: Callable[[sqlite3.Connection], T], durable: bool = False, kept: bool = False, rows: int = 1
    ) -> asyncio.Future[T]:
        return self._writer.submit(op, durable, kept, rows)

    def subscribe(self, wake: Wake) -> None:
        """Another process's writes are found by ``changed_elsewhere`` (the dispatcher polls it)."""

    # --- operations -----------------------------------------------------------------------

    async def accept(
        self,
        batch: Sequence[NewDelivery],
        checkpoint: tuple[str, str] | None = None,
        leased_targets: frozenset[str] = frozenset(),
    ) -> Accepted:
        """Store events and their deliveries durably; return the ids already stored before.

        An id the adapter sent before (it retried) adds nothing, whether that event is still
        queued or was delivered within ``dedup_window_s``. ``checkpoint`` records an adapter's
        position in the same transaction, so a restart resumes exactly after it.

        Deliveries to ``leased_targets`` are stored already leased and returned, so a worker that
        is caught up gets them without reading them back (a restart makes them pending again).
        """
        now = time.time()
        unique = {item.event.id: item for item in reversed(batch)}  # the first of a repeated id
        if len(unique) != len(batch):
            batch = [item for item in batch if unique.get(item.event.id) is item]

        def op(conn: sqlite3.Connection) -> Accepted:
            duplicates = self._seen_before(conn, [i.event.id for i in batch if i.event.id_from_source], now)
            fresh = [item for item in batch if item.event.id not in duplicates] if duplicates else batch
            before = conn.total_changes
            sql.insert_rows(
                conn,
                f"INSERT OR IGNORE INTO events ({EVENT_COLUMNS}, accepted_at) VALUES",
                [event_row(item.event, now) for item in fresh],
            )
            if conn.total_changes - before != len(fresh):
                # An id still queued but older than the dedup window: find which.
                duplicates |= self._stored_before(conn, fresh, now)
            blocked = self._blocked
            pending: list[tuple[str, str, float, str | None]] = []  # event id, target, due, key
            leased: list[tuple[Event, str, str | None, bool]] = []  # ... and whether it is sole
            for item in fresh:
                if item.event.id in duplicates:
                    continue
                keys = item.keys or (None,) * len(item.targets)
                for target, key in zip(item.targets, keys, strict=True):
                    # Behind a delivery of its key that waits for a retry: due when that one is.
                    until = blocked.get((target, key)) if key is not None and blocked else None
                    if until is not None and until > now:
                        pending.append((item.event.id, target, until, key))
                    elif target in leased_targets:
                        leased.append((item.event, target, key, len(item.targets) == 1))
                    else:
                        pending.append((item.event.id, target, now, key))
            insert = "INSERT INTO deliveries (event_id, target, state, due_at, updated_at, okey) VALUES"
            sql.insert_rows(conn, insert, [(e, t, PENDING, due, now, k) for e, t, due, k in pending])
            leases: list[Lease] = []
            if leased:
                sql.insert_rows(conn, insert, [(e.id, t, LEASED, now, now, k) for e, t, k, _ in leased])
                # Rowids inserted by one connection in one transaction are consecutive.
                last = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
                first = last - len(leased) + 1
                leases = [Lease(first + n, t, 0, e, now, k, sole) for n, (e, t, k, sole) in enumerate(leased)]
            if checkpoint is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO checkpoints (source, position) VALUES (?, ?)",
                    checkpoint,
                )
            return Accepted(duplicates, leases)

        return await self._submit(op, durable=True, rows=sum(len(item.targets) for item in batch))

    def _seen_before(self, conn: sqlite3.Connection, ids: list[str], now: float) -> set[str]:
        """Remember adapter-sent ids; return those already remembered (within the window)."""
        if not ids or self.dedup_window_s <= 0:
            return set()
        if now - self._pruned_at > min(60.0, self.dedup_window_s):
            conn.execute("DELETE FROM seen_ids WHERE at < ?", (now - self.dedup_window_s,))
            self._pruned_at = now
        before = conn.total_changes
        sql.insert_rows(conn, "INSERT OR IGNORE INTO seen_ids (id, at) VALUES", [(i, now) for i in ids])
        if conn.total_changes - before == len(ids):
            return set()
        rows = conn.execute(
            f"SELECT id FROM seen_ids WHERE at != ? AND id IN ({','.join('?' * len(ids))})", [now, *ids]
        )
        return {row[0] for row in rows}

    @staticmethod
    def _stored_before(conn: sqlite3.Connection, batch: Sequence[NewDelivery], now: float) -> set[str]:
        """Ids in ``batch`` whose event row was not written by this transaction."""
        ids = [item.event.id for item in batch]
        rows = conn.execute(
            f"SELECT id FROM events WHERE accepted_at != ? AND id IN ({','.join('?' * len(ids))})",
            [now, *ids],
        )
        return {row[0] for row in rows}

    async def lease(
        self, target: str, limit: int, now: float | None = None, exclusive: bool = False
    ) -> list[Lease]:
        """Take up to ``limit`` due deliveries of ``target``, oldest first. (``exclusive`` needs
        nothing here: one process uses the file, and its worker keeps its own concurrency.)"""
        due = time.time() if now is None else now

        def op(conn: sqlite3.Connection) -> list[Lease]:
            rows = conn.execute(
                f"SELECT d.id, d.attempts, e.accepted_at, d.okey, {_EVENT_COLUMNS_OF_E} FROM deliveries d"
                " JOIN events e ON e.id = d.event_id"
                " WHERE d.target = ? AND d.state = ? AND d.due_at <= ? ORDER BY d.due_at, d.id LIMIT ?",
                (target, PENDING, due, limit),
            ).fetchall()
            if rows:
                conn.execute(
                    f"UPDATE deliveries SET state = ? WHERE id IN ({','.join('?' * len(rows))})",
                    [LEASED, *(r[0] for r in rows)],
                )
            return [Lease(r[0], target, r[1], event_from_row(r[4:]), r[2], r[3]) for r in rows]

        return await self._submit(op)

    async def changed_elsewhere(self) -> bool:
        """Whether another connection (another process) committed since the last call."""

        def op(conn: sqlite3.Connection) -> bool:
            version = int(conn.execute("PRAGMA data_version").fetchone()[0])
            changed = self._data_version is not None and version != self._data_version
            self._data_version = version
            return changed

        return await self._submit(op)

    async def next_due(self, target: str) -> float | None:
        """When the next pending delivery of ``target`` falls due (None: nothing pending)."""
        return await self._submit(lambda conn: sql.next_due(conn, target))

    def ack(self, lease: Lease) -> asyncio.Future[None]:
        """Delivered: delete the delivery, and the event once no delivery needs it.

        Acks are gathered and written together in the next transaction; the future resolves
        when this one is written. A failure is logged (the delivery is then made again after a
        restart, as at-least-once allows)."""
        self._acks.append(lease)
        self._writer.wake()
        if self._acks_written is None:
            self._acks_written = self._ack_future()
        return self._acks_written

    def _ack_future(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is not None:
                log.error("store.ack_failed", error=str(f.exception()))

        future.add_done_callback(done)
        return future

    def retry(self, lease: Lease, due_at: float, error: str) -> asyncio.Future[None]:
        """Failed, try again at ``due_at``; the error is kept with the attempt.

        The later deliveries of its ordering key wait with it: due no sooner than ``due_at``,
        and so are those its key gets until then (``accept``), so none overtakes it."""
        fail = sql.fail_op(lease, PENDING, due_at, error)
        if lease.okey is None:
            return self._submit(fail, kept=True)
        where = (lease.target, lease.okey)

        def op(conn: sqlite3.Connection) -> None:
            fail(conn)
            sql.hold_back_key(conn, lease, due_at)
            self._blocked[where] = max(due_at, self._blocked.get(where, 0.0))

        return self._submit(op, kept=True)

    def park(self, leases: Sequence[Lease]) -> asyncio.Future[None]:
        """Leased deliveries whose key has enough waiting in memory: out of the way of other
        keys' deliveries until ``unpark`` (or a restart) makes them pending again."""
        ids = [lease.delivery_id for lease in leases]
        return self._submit(lambda conn: sql.park(conn, ids), kept=True)

    def unpark(self, target: str, key: str, limit: int) -> asyncio.Future[int | None]:
        """The oldest ``limit`` parked deliveries of ``key`` pending again; returns the id of the
        oldest still parked (None: none is)."""
        return self._submit(lambda conn: sql.unpark(conn, target, key, limit), kept=True)

    def hold(self, leases: Sequence[Lease], until: float) -> asyncio.Future[None]:
        """Give back leased deliveries not attempted: pending again, due no sooner than ``until``."""
        ids = [lease.delivery_id for lease in leases]
        return self._submit(lambda conn: sql.hold(conn, ids, until), kept=True)

    def kill(self, lease: Lease, error: str) -> asyncio.Future[None]:
        """Failed for good: keep it as a dead letter with its last error."""
        return self._submit(sql.fail_op(lease, DEAD, time.time(), error), kept=True)

    async def kill_target(self, target: str, error: str) -> int:
        """Dead-letter every pending delivery of a target that no longer exists."""
        return await self._submit(lambda conn: sql.kill_target(conn, target, error))

    async def probe(self) -> None:
        """Write one row: raises if the database cannot take a write (disk full, read-only ...)."""
        await self._submit(sql.probe)

    async def pending_targets(self) -> set[str]:
        return await self._submit(sql.pending_targets)

    async def checkpoint(self, source: str) -> str | None:
        return await self._submit(lambda conn: sql.checkpoint(conn, source))

    async def sink_state(self) -> dict[str, tuple[int, int, float | None]]:
        """By sink: (deliveries waiting or in flight, dead letters, age of the oldest waiting)."""
        return await self._submit(sql.sink_state)

    async def due_or_leased(self, now: float | None = None) -> int:
        """Deliveries being attempted, or due and waiting for an attempt (not those due later)."""
        due = time.time() if now is None else now
        return await self._submit(lambda conn: sql.due_or_leased(conn, due))

    async def counts(self) -> dict[str, int]:
        """Deliveries by state: ``pending`` (incl. in flight) and ``dead``."""
        return await self._submit(sql.counts)
