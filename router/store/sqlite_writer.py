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
import functools
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
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
# A job for the writer's thread: a function, its arguments, and what gets (ok, result or
# exception) back on the loop.
Job = tuple[Callable[..., Any], tuple[Any, ...], Callable[[bool, Any], None] | None]


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

    The thread takes one job at a time from a queue; what it did comes back to the event loop as
    one callback, which resolves the operations' futures and hands the thread the next batch,
    with no task woken in between. ``gather`` is asked before each transaction for an operation
    to write first (the store's gathered acks); ``between`` runs on the writer's thread every
    ``VACUUM_EVERY_S``, between transactions."""

    def __init__(self, path: Path, gather: Callable[[], Queued | None], between: Callable[[], None]) -> None:
        self.path = path
        self._gather = gather
        self._between = between
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="store", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.conn: sqlite3.Connection | None = None
        self._ops: list[Queued] = []
        self.full = False  # the last write failed for lack of disk space
        self.transactions = 0  # written so far, for tests and metrics
        self._synchronous = ""
        self._vacuumed_at = 0.0
        self._busy = False  # the thread has a job, or kept writes wait for room
        self._kicked = False  # a look at the queue is scheduled on the loop
        self._ticker: asyncio.TimerHandle | None = None
        self._closing = False
        self._drained: asyncio.Future[None] | None = None  # ``run`` waits for it
        self._jumped = False  # the last transaction's light operations went ahead of accepts

    def call(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``fn`` on the writer's thread, after the job under way (opening, closing, tests)."""
        future: asyncio.Future[T] = self._running_loop().create_future()

        def done(ok: bool, value: Any) -> None:
            if not future.done():
                future.set_result(value) if ok else future.set_exception(value)

        self._jobs.put((fn, (), done))
        return future

    def submit(
        self, op: Callable[[sqlite3.Connection], T], durable: bool = False, kept: bool = False, rows: int = 1
    ) -> asyncio.Future[T]:
        if self._closing and self.conn is None:
            raise RuntimeError("store is closed")
        future: asyncio.Future[T] = self._running_loop().create_future()
        self._ops.append(Queued(op, future, durable, kept, rows))
        self.wake()
        return future

    def wake(self) -> None:
        """Something was queued or gathered: the next transaction takes it, once the thread is
        free (what is queued within one turn of the loop goes together)."""
        if not self._busy and not self._kicked:
            self._kicked = True
            self._running_loop().call_soon(self._next)

    async def run(self) -> None:
        """Write what is queued until ``close``; every ``VACUUM_EVERY_S``, give free pages back."""
        loop = self._running_loop()
        self._drained = loop.create_future()
        self._tick()
        try:
            await self._drained
        finally:
            if self._ticker is not None:
                self._ticker.cancel()

    async def close(self) -> None:
        """Stop ``run`` once everything queued is written."""
        self._closing = True
        self.wake()

    def shutdown(self) -> None:
        """Close the connection and stop the thread (after ``run`` has returned)."""

        def close() -> None:
            if self.conn is not None:
                conn, self.conn = self.conn, None
                conn.close()

        if not self._thread.is_alive():
            close()
            return
        self._jobs.put((close, (), None))
        self._jobs.put(None)
        self._thread.join()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._thread.start()
        return self._loop

    def _serve(self) -> None:
        """The writer's thread: each job's outcome goes back to the loop as one callback."""
        loop = self._loop
        assert loop is not None
        while (job := self._jobs.get()) is not None:
            fn, args, done = job
            try:
                ok, value = True, fn(*args)
            except BaseException as exc:  # handed to the caller's future
                ok, value = False, exc
            if done is not None:
                try:
                    loop.call_soon_threadsafe(done, ok, value)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    return

    def _tick(self) -> None:
        """Every ``VACUUM_EVERY_S``: a look at the queue, so an idle store gives pages back too."""
        assert self._loop is not None
        self._ticker = self._loop.call_later(VACUUM_EVERY_S, self._tick)
        self.wake()

    def _next(self) -> None:
        """Hand the thread its next job: a vacuum step when one is due, else the next batch."""
        self._kicked = False
        if self._busy:
            return
        now = time.monotonic()
        if now - self._vacuumed_at >= VACUUM_EVERY_S:
            self._vacuumed_at = now
            self._busy = True
            self._jobs.put((self._vacuum_step, (), self._vacuumed))
            return
        if (first := self._gather()) is not None:
            self._ops.insert(0, first)
        if self._ops:
            batch = self._next_batch()
            durable = any(item.durable for item in batch)
            self._busy = True
            done = functools.partial(self._written, batch)
            self._jobs.put((self._apply, ([item.op for item in batch], durable), done))
        elif self._closing and self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

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

    def _written(self, batch: list[Queued], ok: bool, outcomes: Any) -> None:
        """(On the loop.) The next batch is picked in the loop's next turn, ahead of what waits
        for this one (the thread starts on it while their callbacks run); then each operation's
        future gets its own outcome."""
        self._busy = False
        if not ok:  # the job itself failed (not one operation): all of the batch with it
            outcomes = [(False, outcomes)] * len(batch)
        kept: list[Queued] = []  # written once there is room again; nothing else before them
        settled: list[tuple[Queued, bool, Any]] = []
        for item, (done, value) in zip(batch, outcomes, strict=True):
            if item.future.done():
                continue
            if not done and item.kept and is_disk_full(value) and not self._closing:
                kept.append(item)
            else:
                settled.append((item, done, value))
        if kept:
            self._ops[:0] = kept
            self._busy = True
            assert self._loop is not None
            self._loop.call_later(FULL_RETRY_S, self._retry)
        else:
            self.wake()
        for item, done, value in settled:
            if done:
                item.future.set_result(value)
            else:
                item.future.set_exception(StorageFull(self.path) if is_disk_full(value) else value)
        self._note_space(full=any(not done and is_disk_full(value) for done, value in outcomes))

    def _retry(self) -> None:
        self._busy = False
        self.wake()

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

    def _vacuumed(self, ok: bool, error: Any) -> None:
        """(On the loop.) A vacuum step is done; the next job."""
        if not ok:  # the disk may be full (said once, by the writer): later
            log.debug("store.vacuum_failed", error=str(error))
        self._busy = False
        self.wake()

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
