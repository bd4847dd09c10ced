"""A delivery worker: one per target, the only retry loop.

A ``TargetWorker`` leases its target's due deliveries from the store and runs up to
``concurrency`` attempts at once, so a slow or dead target only ever occupies its own slots.
Each attempt (``router.attempt``) ends in exactly one of: ack (delivered), retry (rescheduled
with backoff, or the receiver's ``Retry-After``), or kill (a dead letter with its last error).
Deliveries that share an ordering key go one at a time (``router.keyqueue``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine, Hashable, Sequence
from typing import Any, Protocol

from router import logs
from router.attempt import Attempts, track
from router.errors import Unavailable
from router.keyqueue import MAX_FOLLOWERS, KeyQueue
from router.lanes import LanePool
from router.retry import RetryPolicy
from router.sinks import BaseSink
from router.store import Lease, QueueStore

log = logs.get_logger("router.delivery")
# A worker holds up to this many times its concurrency in memory, leased or handed over by
# intake (all workers together: ROUTER_LEASE_BUFFER). What it holds goes out without being read
# back from the store, so a burst that fits is stored once and deleted once, nothing more.
LEASE_AHEAD = 256
LEASE_BATCH = 2048  # deliveries one lease reads at most (a longer read would hold up accepts)
# ... and up to this much of their event data: events carrying media can be large. A worker
# over it takes nothing more from intake and leases nothing more until attempts bring it under.
HOLD_BYTES = 64 * 1024 * 1024
STORE_RETRY_S = 1.0  # a worker whose lease failed (disk full ...) leases again after this
SINK_WAIT_S = 1.0  # lanes waiting for a sink that is down look at whether to stop this often


class Host(Protocol):
    """What a worker needs of the dispatcher that owns it (``router.delivery.Dispatcher``)."""

    store: QueueStore
    attempts: Attempts
    buffered: int  # deliveries held in memory, all workers together (ROUTER_LEASE_BUFFER)

    def reserve(self, wanted: int, floor: int = 0) -> int:
        """Up to ``wanted`` places in the shared lease buffer (``floor`` of them whatever it holds)."""

    def release(self, count: int) -> None:
        """``count`` places in the shared lease buffer are free again."""

    async def budget_freed(self, worker: TargetWorker) -> None:
        """Until the shared lease buffer has room for ``worker``."""

    def stop_waiting(self, worker: TargetWorker) -> None:
        """``worker`` no longer waits for room in the buffer."""

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run a worker's leaser as one of the dispatcher's tasks."""

    def pool_of(self, worker: TargetWorker) -> LanePool:
        """The lanes of the place ``worker``'s target reaches."""

    def is_retired(self, key: str) -> bool:
        """Target ``key`` was removed from the configuration."""

    def forget(self, worker: TargetWorker) -> None:
        """``worker`` stopped for good."""


class TargetWorker:
    """Delivers one target's stored deliveries; see the module docstring."""

    __slots__ = (
        "_due_at",
        "_lanes",
        "_leaser",
        "_low",
        "_more_waiter",
        "_queue",
        "_refused",
        "_stopping",
        "_troubled",
        "_wake_waiter",
        "_woken",
        "ahead",
        "caught_up",
        "concurrency",
        "dispatcher",
        "held_bytes",
        "in_flight",
        "key",
        "mean_size",
        "place",
        "policy",
        "reserved",
        "sink",
    )

    def __init__(
        self,
        key: str,
        dispatcher: Host,
        sink: BaseSink,
        policy: RetryPolicy,
        concurrency: int,
        *,
        nothing_stored: bool = False,
    ) -> None:
        self.key = key
        self.dispatcher = dispatcher
        self.sink = sink
        self.policy = policy
        self.concurrency = concurrency
        self.ahead = concurrency * LEASE_AHEAD  # leased and held in memory, at most
        # The leaser leases again once fewer than this are ready, so the next lease (queued
        # behind whatever transaction the store is writing) comes back before the lanes run dry.
        self._low = self.ahead // 2
        self.in_flight = 0
        self._queue = KeyQueue()  # leased, not in flight, in the order their keys require
        self.held_bytes = 0  # event data of the deliveries in ``_queue``
        self.mean_size = 0  # of an event's data, in the last batch it took (what a lease may read)
        # Set when deliveries were stored pending (or a retry is due, or a stop): the leaser
        # looks again. The leaser waits for it, or for fewer to be held than it keeps; each
        # wait is a future made while the leaser waits (no object per idle target).
        self._woken = False
        self._wake_waiter: asyncio.Future[None] | None = None
        self._more_waiter: asyncio.Future[None] | None = None
        self._lanes = 0  # lanes serving it, or its turns in line for one (``router.lanes``)
        # Where its lanes come from: the place its target reaches and that place's limit, as
        # the dispatcher worked it out (None: not yet, or a reload may have moved the target).
        self.place: tuple[Hashable, int] | None = None
        self._stopping = False
        # Nothing due is left in the store (the last lease came back short): new deliveries may
        # then come straight from intake without overtaking older ones.
        self.caught_up = nothing_stored
        # Its leaser task runs only while there is something in the store to lease: from a wake
        # (deliveries stored pending) until the target is caught up with nothing due. Lanes
        # (``router.lanes``) run only while a target of theirs has deliveries in hand. So an
        # idle target costs no task, and one fed by intake alone needs no leaser.
        self._leaser: asyncio.Task[None] | None = None
        # When the next pending delivery falls due, as the store last said (None: none is;
        # 0: not known since). The leaser ends only when none is.
        self._due_at: float | None = None
        self.reserved = 0  # places promised to intake for deliveries being stored
        # Deliveries stored pending so far (claims refused, wakes): possibly after a lease under
        # way read the store, so that lease cannot tell the worker it is caught up.
        self._refused = 0
        self._troubled = False  # the store failed us last time (logged once until it works)

    @property
    def free_lanes(self) -> int:
        """Attempt slots with nothing ready for them: this many may be leased whatever the shared
        lease buffer holds, so no backlog of other targets ever keeps this one waiting."""
        return max(0, self.concurrency - self.in_flight - len(self._queue) - self.reserved)

    def claim(self, count: int) -> bool:
        """Take ``count`` new deliveries straight from intake, if that keeps their order."""
        room = self.ahead - len(self._queue) - self.reserved
        # (Under HOLD_BYTES before this batch: one batch may take it over by its own size.)
        if self._stopping or not self.caught_up or count > room or self.held_bytes >= HOLD_BYTES:
            self.caught_up = False  # they go through the store, behind what is there
            self._refused += 1
            return False
        self.reserved += count
        return True

    def take(self, leases: Sequence[Lease], reserved: int) -> None:
        self.reserved -= reserved
        if leases:
            self._admit(leases)

    def _run_leaser(self) -> None:
        if self._leaser is None and not self._stopping:
            self._leaser = self.dispatcher.spawn(self._lease_loop(), f"worker {self.key}")

    def _admit(self, leases: Sequence[Lease]) -> None:
        size = _data_size(leases)
        self.held_bytes += size
        self.mean_size = size // len(leases) if leases else self.mean_size
        late, park = self._queue.admit(leases)
        for until, given_back in late.items():
            self._give_back(given_back, until)
        if park:
            self.held_bytes -= _data_size(park)
            track(self.dispatcher.store.park(park))
            self.dispatcher.release(len(park))
            self._more_wanted()
        self._start_lanes()

    def _give_back(self, leases: Sequence[Lease], until: float) -> None:
        """Leases not to attempt now: pending in the store again, due at ``until``."""
        self.held_bytes -= _data_size(leases)
        track(self.dispatcher.store.hold(leases, until))
        self.dispatcher.release(len(leases))
        self._more_wanted()
        self.wake()  # the leaser leases them when they fall due

    def _done(self, lease: Lease, retry_at: float | None, written: asyncio.Future[Any] | None) -> None:
        """``lease``'s attempt ended: once ``written`` (its ack or dead letter) is in the store,
        the next of its key is ready (so a kill repeats at most this one); after a retry, all
        of its key wait for that retry."""
        if retry_at is not None:
            if followers := self._queue.retried(lease, retry_at):
                self._give_back(followers, retry_at)
        elif written is None or written.done():
            self._next_of(lease)
        else:
            written.add_done_callback(lambda _: self._next_of(lease))

    def _next_of(self, lease: Lease) -> None:
        if (key := self._queue.finished(lease)) is not None:
            self._unpark(key)
        if self._queue.ready:  # the next of its key, now ready
            self._start_lanes()

    def _unpark(self, key: str) -> None:
        """Bring the next batch of ``key``'s parked deliveries back: pending, then leased."""
        if self._stopping:  # parked ones are pending again at the next start
            return
        written = self.dispatcher.store.unpark(self.key, key, MAX_FOLLOWERS + 1)

        def done(future: asyncio.Future[int | None]) -> None:
            if future.cancelled():
                return
            if (exc := future.exception()) is not None:  # they stay parked: try again soon
                log.warning(
                    "delivery.store_unavailable", target=self.key, error=str(exc), retry_in_s=STORE_RETRY_S
                )
                asyncio.get_running_loop().call_later(STORE_RETRY_S, self._unpark, key)
                return
            self._queue.unparked(key, future.result())
            self.wake()  # they are pending now: lease them

        written.add_done_callback(done)

    def _start_lanes(self) -> None:
        """A lane per delivery in flight or ready, up to ``concurrency``: an idle target has none,
        and one waiting on a slow attempt does not keep a ready delivery waiting. Lanes come
        from the pool of the place the target reaches (``router.lanes``)."""
        if self._stopping:
            return
        wanted = self.in_flight + len(self._queue.ready)
        wanted = self.concurrency if wanted > self.concurrency else wanted
        if self._lanes < wanted:
            pool = self.dispatcher.pool_of(self)
            while self._lanes < wanted:
                self._lanes += 1
                pool.want(self)

    def wake(self) -> None:
        """Deliveries of this target were stored pending: lease them before taking any more
        from intake (a handover now would overtake them)."""
        self.caught_up = False
        self._refused += 1
        self._rouse()
        self._run_leaser()

    def stop(self) -> None:
        """Stop leasing and starting attempts; attempts under way finish (bounded by the dispatcher)."""
        self._stopping = True
        self._rouse()
        self._more_wanted()
        self.dispatcher.stop_waiting(self)

    async def _lease_loop(self) -> None:
        """The leaser keeps a buffer of leased deliveries; up to ``concurrency`` lanes attempt them.

        Leasing ahead of the lanes lets the next lease overlap with attempts under way. What is
        leased but not attempted when the process stops is pending again at the next start.
        """
        try:
            await self._lease_while_stored()
        finally:
            self._leaser = None  # (here, not in a done callback: a wake from now on runs it again)

    async def _lease_while_stored(self) -> None:
        store = self.dispatcher.store
        while not self._stopping:
            if self.caught_up and self._due_at is None and not self._woken:
                return  # nothing stored to lease: intake hands new deliveries over
            room = self.ahead - len(self._queue) - self.reserved
            ready = self._queue.ready
            full = room <= 0 or self.held_bytes >= HOLD_BYTES
            if len(ready) >= self._low or full or (room < self.concurrency and ready):
                # Enough to do: lease again in batches, not one by one.
                self._more_waiter = waiter = asyncio.get_running_loop().create_future()
                try:
                    await waiter
                finally:
                    self._more_waiter = None
                continue
            if self.mean_size:  # read no more than the room left in HOLD_BYTES, as far as known
                room = min(room, max(1, (HOLD_BYTES - self.held_bytes) // self.mean_size))
            want = self.dispatcher.reserve(min(room, LEASE_BATCH), floor=self.free_lanes)
            if want == 0:  # every target together holds ROUTER_LEASE_BUFFER leased events
                await self.dispatcher.budget_freed(self)
                continue
            self._woken = False  # before leasing: a notify during the lease is not lost
            refused = self._refused
            try:
                leases = await store.lease(self.key, want, exclusive=self.concurrency == 1)
            except Exception as exc:  # a full disk, a locked file: wait and lease again
                self.dispatcher.release(want)
                await self._store_trouble(exc)
                continue
            self.dispatcher.release(want - len(leases))
            self._troubled = False
            self.caught_up = len(leases) < want and self._refused == refused
            if leases:
                self._due_at = 0.0  # what falls due next is not known: the next round asks
                self._admit(leases)
                continue
            try:
                due_at = await store.next_due(self.key)
            except Exception as exc:
                await self._store_trouble(exc)
                continue
            if due_at is None and self.dispatcher.is_retired(self.key) and not self.busy:
                self.stop()  # removed from the configuration, and nothing is left for it
                self.dispatcher.forget(self)
                return
            self._due_at = due_at
            if due_at is not None:  # (none: the loop ends, unless woken meanwhile)
                await self._sleep_until(due_at)

    async def _store_trouble(self, exc: Exception) -> None:
        """The store failed a read or write: say so once for this target, and try again soon."""
        if not self._troubled:
            log.warning(
                "delivery.store_unavailable", target=self.key, error=str(exc), retry_in_s=STORE_RETRY_S
            )
        self._troubled = True
        await self._sleep_until(time.time() + STORE_RETRY_S)
        self._troubled = False if self._stopping else self._troubled

    @property
    def busy(self) -> bool:
        return len(self._queue) > 0 or self.in_flight > 0 or self.reserved > 0 or self._queue.parking

    @property
    def idle(self) -> bool:
        """Nothing in hand, no leaser running and, as far as it knows, nothing stored for it."""
        return self.caught_up and self._due_at is None and self._leaser is None and not self.busy

    @property
    def has_ready(self) -> bool:
        return bool(self._queue.ready) and not self._stopping

    def lane_left(self) -> None:
        self._lanes -= 1
        if self._lanes == 0 and self.dispatcher.is_retired(self.key) and not self.busy:
            self.wake()  # the leaser looks whether anything is left, and stops the worker if not
        if self._queue.ready and not self._stopping:  # handed over while the lane was finishing
            self._start_lanes()

    async def attempt_next(self) -> None:
        """Attempt the next ready delivery, in a lane (``router.lanes``)."""
        if not self.sink.ready:  # its connection is down: wait for it, not attempt by attempt
            with contextlib.suppress(TimeoutError):  # and look at _stopping now and then
                await asyncio.wait_for(self.sink.wait_ready(), SINK_WAIT_S)
            return
        ready = self._queue.ready
        lease = ready.popleft()
        self.dispatcher.release(1)
        size = len(lease.event.data)
        self.held_bytes -= size
        if len(ready) < self._low or self.held_bytes < HOLD_BYTES <= self.held_bytes + size:
            self._more_wanted()
        self.in_flight += 1
        try:
            attempted = await self._attempt(lease)
        finally:
            self.in_flight -= 1
        if attempted:
            # A slot is free: a leaser waiting for room in the shared buffer may fill it.
            self.dispatcher.stop_waiting(self)
        else:
            ready.appendleft(lease)  # not attempted after all: first again, uncounted
            self.dispatcher.buffered += 1  # held in memory again
            self.held_bytes += size
            await asyncio.sleep(0)  # the sink's own tasks run before the lane looks again

    def _rouse(self) -> None:
        self._woken = True
        _resolve(self._wake_waiter)

    def _more_wanted(self) -> None:
        """Fewer are ready or held than the leaser keeps: it leases again, if it waits for that."""
        _resolve(self._more_waiter)

    async def _sleep_until(self, due_at: float | None) -> None:
        """Until ``due_at`` (None: for ever), or until roused."""
        if self._woken:
            return
        timeout = None if due_at is None else max(0.0, due_at - time.time())
        self._wake_waiter = waiter = asyncio.get_running_loop().create_future()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, timeout)
        finally:
            self._wake_waiter = None

    async def _attempt(self, lease: Lease) -> bool:
        """Attempt ``lease``; False when the sink turned out to be unavailable (not an attempt)."""
        try:
            retry_at, written = await self.dispatcher.attempts.run(self.key, self.sink, self.policy, lease)
        except Unavailable:
            return False
        except Exception:  # a bug here must not stop the other attempts or the daemon
            log.exception("delivery.bug", target=self.key, event_id=lease.event.id)
            retry_at, written = None, None
        if retry_at is not None:
            self._due_at = 0.0
            self._rouse()  # the leaser recomputes when the next delivery is due
            self._run_leaser()
        self._done(lease, retry_at, written)
        return True


def _resolve(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


def _data_size(leases: Sequence[Lease]) -> int:
    size = 0
    for lease in leases:  # (not sum() of a generator: most batches handed over hold one lease)
        size += len(lease.event.data)
    return size
