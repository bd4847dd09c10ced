"""The SQLite queue's writer: one connection on one thread, written to in batches.

Operations queue up while a transaction is being written and are then applied together, one
transaction for the lot (group commit), so the store keeps up with intake. Leases and retries
(not durable) go ahead of queued accepts, in a transaction of their own, so a worker's next
lease never waits for accepted events to be synced; not twice running, so a steady stream of
them never keeps accepts waiting. Acks ride with the next transaction, whatever it holds: only
the next delivery of their key waits for them, and an accept need not wait for a commit of
theirs before its own. An accepting transaction holds at most
``MAX_ROWS_PER_TRANSACTION`` deliveries, so the wait for it stays short. Each operation runs in its
own savepoint: one failing operation fails only its own caller.

A transaction that accepts events commits with ``synchronous=FULL``, the others with ``NORMAL``
(see ``router.store.sqlite``). When the disk is full, kept operations (acks, retries, kills) are
tried again every ``FULL_RETRY_S``; the others fail with ``StorageFull``. Between transactions,
free pages are given back a few megabytes at a time (``auto_vacuum=INCREMENTAL``).
"""

from __future__ import annotations

import asyncio
import errno
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from router import logs
from router.errors import StorageFull

T = TypeVar("T")

log = logs.get_logger("router.store")
MAX_OPS_PER_TRANSACTION = 4096
MAX_ROWS_PER_TRANSACTION = 2000  # deliveries an accepting transaction writes (more: one batch alone)
FULL_RETRY_S = 1.0  # with the disk full, kept writes (acks, retries) are tried again this often
VACUUM_EVERY_S = 2.0  # how often free pages are looked at
VACUUM_MIN_FREE_PAGES = 256  # fewer free pages than this are kept for reuse
VACUUM_STEP_PAGES = 2048  # pages given back per step (8 MiB of 4 KiB pages)

Op = Callable[[sqlite3.Connection], Any]


def is_disk_full(exc: BaseException) -> bool:
    """SQLite could not write for lack of space (SQLITE_FULL, or the OS saying ENOSPC)."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno == errno.ENOSPC


@dataclass(slots=True)
class Queued:
    """An operation waiting for the next transaction."""

    op: Op
    future: asyncio.Future[Any]
    durable: bool = False  # accepted events: synced before the future resolves
    kept: bool = False  # tried again when the disk is full, instead of failing
    rows: int = 1  # deliveries it writes, for the size of a transaction
    rides: bool = False  # goes with the next transaction, whatever it holds (never alone ahead of accepts)


class Writer:
    """Applies queued operations to ``conn`` on its own thread until ``close``.

    ``gather`` is asked before each transaction for an operation to write first (the store's
    gathered acks); ``between`` runs on the writer's thread every ``VACUUM_EVERY_S``, between
    transactions."""

    def __init__(self, path: Path, gather: Callable[[], Queued | None], between: Callable[[], None]) -> None:
        self.path = path
        self._gather = gather
        self._between = between
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self.conn: sqlite3.Connection | None = None
        self._ops: list[Queued] = []
        self.full = False  # the last write failed for lack of disk space
        self.transactions = 0  # written so far, for tests and metrics
        self._synchronous = ""
        self._vacuumed_at = 0.0
        self._wake = asyncio.Event()
        self._closing = False
        self._jumped = False  # the last transaction's light operations went ahead of accepts

    def submit(
        self, op: Callable[[sqlite3.Connection], T], durable: bool = False, kept: bool = False, rows: int = 1
    ) -> asyncio.Future[T]:
        if self._closing and self.conn is None:
            raise RuntimeError("store is closed")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._ops.append(Queued(op, future, durable, kept, rows))
        self._wake.set()
        return future

    def wake(self) -> None:
        """Something was gathered for the next transaction."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), VACUUM_EVERY_S)
            except TimeoutError:  # idle: a good moment to give pages back
                await self._vacuum_if_due()
                continue
            self._wake.clear()
            await self._vacuum_if_due()
            while True:
                if (first := self._gather()) is not None:
                    self._ops.insert(0, first)
                if not self._ops:
                    break
                await self._write(self._next_batch())
            if self._closing:
                return

    async def close(self) -> None:
        """Stop ``run`` once everything queued is written."""
        self._closing = True
        self._wake.set()

    def shutdown(self) -> None:
        """Close the connection (after ``run`` has returned)."""
        if self.conn is not None:
            conn, self.conn = self.conn, None
            self.executor.submit(conn.close).result()
        self.executor.shutdown(wait=True)

    def _next_batch(self) -> list[Queued]:
        """The next transaction's operations: the light ones (leases, retries, reads, and the
        acks with them) first when accepts are queued too, but not twice running, so a steady
        stream of them never keeps accepts waiting. Acks alone go with the accepts."""
        queued = self._ops
        light = [item for item in queued if not item.durable]
        urgent = any(not item.rides for item in light)  # acks alone do not go ahead
        self._jumped = not self._jumped and urgent and len(light) < len(queued)
        if self._jumped:
            batch = light[:MAX_OPS_PER_TRANSACTION]
            taken = set(map(id, batch))
            self._ops = [item for item in queued if id(item) not in taken]
            return batch
        batch, rows = [], 0
        for item in queued:
            full = len(batch) == MAX_OPS_PER_TRANSACTION or rows + item.rows > MAX_ROWS_PER_TRANSACTION
            if batch and full:
                break
            batch.append(item)
            rows += item.rows
        del queued[: len(batch)]
        return batch

    async def _write(self, batch: list[Queued]) -> None:
        """One transaction for ``batch``; each operation's future gets its own outcome."""
        durable = any(item.durable for item in batch)
        outcomes = await asyncio.get_running_loop().run_in_executor(
            self.executor, self._apply, [item.op for item in batch], durable
        )
        kept = []
        for item, (ok, value) in zip(batch, outcomes, strict=True):
            if item.future.done():
                continue
            if ok:
                item.future.set_result(value)
            elif is_disk_full(value) and item.kept and not self._closing:
                kept.append(item)  # written once there is room again
            else:
                item.future.set_exception(StorageFull(self.path) if is_disk_full(value) else value)
        self._note_space(full=any(not ok and is_disk_full(v) for ok, v in outcomes))
        if kept:
            self._ops[:0] = kept
            await asyncio.sleep(FULL_RETRY_S)

    def _apply(self, ops: list[Op], durable: bool) -> list[tuple[bool, Any]]:
        conn = self.conn
        assert conn is not None, "store is closed"
        synchronous = "FULL" if durable else "NORMAL"
        if synchronous != self._synchronous:
            conn.execute(f"PRAGMA synchronous={synchronous}")
            self._synchronous = synchronous
        outcomes: list[tuple[bool, Any]] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, op(conn)))
                    conn.execute("RELEASE op")
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    conn.execute("RELEASE op")
                    outcomes.append((False, exc))
            conn.execute("COMMIT")
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return [(False, exc)] * len(ops)
        self.transactions += 1
        return outcomes

    async def _vacuum_if_due(self) -> None:
        """Every ``VACUUM_EVERY_S``: one bounded step of giving free pages back, between transactions."""
        now = time.monotonic()
        if now - self._vacuumed_at < VACUUM_EVERY_S:
            return
        self._vacuumed_at = now
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, self._vacuum_step)
        except sqlite3.Error as exc:  # the disk may be full (said once, by the writer): later
            log.debug("store.vacuum_failed", error=str(exc))

    def _vacuum_step(self) -> None:
        conn = self.conn
        assert conn is not None, "store is closed"
        self._between()
        if int(conn.execute("PRAGMA freelist_count").fetchone()[0]) >= VACUUM_MIN_FREE_PAGES:
            # executescript steps the pragma to its end (execute would free one page); it runs
            # outside any transaction here, on the writer's thread, between two batches.
            conn.executescript(f"PRAGMA incremental_vacuum({VACUUM_STEP_PAGES});")

    def _note_space(self, full: bool) -> None:
        """One log line when the disk fills up, one when writes go through again."""
        if full and not self.full:
            log.error("store.disk_full", path=str(self.path), hint="intake answers 503 until there is room")
        elif self.full and not full:
            log.info("store.writable", path=str(self.path))
        self.full = full
