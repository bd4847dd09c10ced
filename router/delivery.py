"""Delivery workers: the only retry loop.

One ``TargetWorker`` per target leases that target's due deliveries from the store and runs up to
``concurrency`` attempts at once, so a slow or dead target only ever occupies its own slots.
Each attempt ends in exactly one of: ack (delivered), retry (rescheduled with backoff, or the
receiver's ``Retry-After``), or kill (a dead letter with its last error).

Deliveries that share an ordering key (``router.ordering``: one chat, one instance) are attempted
one at a time, oldest first: the others of that key wait in memory behind the one ready or in
flight, and a retry gives them back to the store, due with it (``Store.retry``), so nothing of a
key overtakes a delivery waiting for its retry. Deliveries without a key use any free slot.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from router import logs
from router.current import Current
from router.errors import PermanentError, RetryableError, Unavailable
from router.metrics import Metrics
from router.retry import RetryPolicy
from router.routing import Routes, Target
from router.settings import Settings
from router.sinks import BaseSink
from router.sinks.registry import kind_of
from router.store import Lease, Store

log = logs.get_logger("router.delivery")
LEASE_AHEAD = 16  # a worker keeps up to this many times its concurrency leased ahead
EXTERNAL_POLL_S = 2.0  # how often the dispatcher looks for writes by other processes
STORE_RETRY_S = 1.0  # a worker whose lease failed (disk full ...) leases again after this
SINK_WAIT_S = 1.0  # lanes waiting for a sink that is down look at whether to stop this often


class TargetWorker:
    """Delivers one target's stored deliveries; see the module docstring."""

    def __init__(
        self,
        key: str,
        dispatcher: Dispatcher,
        sink: BaseSink,
        policy: RetryPolicy,
        concurrency: int,
        *,
        nothing_stored: bool = False,
    ) -> None:
        self.key = key
        self._nothing_stored = nothing_stored  # skip the first lease: wait for work to come
        self.dispatcher = dispatcher
        self.sink = sink
        self.policy = policy
        self.concurrency = concurrency
        self.in_flight = 0
        # Leased and ready to attempt: the oldest of their key here or in flight, or keyless.
        self._ready: collections.deque[Lease] = collections.deque()
        # Key -> the leased deliveries of that key waiting behind the one ready or in flight
        # (a key is here exactly while one of its deliveries is ready or in flight).
        self._followers: dict[str, collections.deque[Lease]] = {}
        self._held = 0  # deliveries in ``_followers``
        self._blocked: dict[str, float] = {}  # key -> until: a retry of it is waiting
        self._wake = asyncio.Event()  # new deliveries stored, or an attempt finished
        self._lanes = 0  # lane tasks running: started when there is work, ended when there is none
        self._group: asyncio.TaskGroup | None = None
        self._need_more = asyncio.Event()  # leaser: ``_ready`` is running low
        self._stopping = False
        # Nothing due is left in the store (the last lease came back short): new deliveries may
        # then come straight from intake without overtaking older ones.
        self.caught_up = False
        self.reserved = 0  # places promised to intake for deliveries being stored
        # Deliveries stored pending so far (claims refused, wakes): possibly after a lease under
        # way read the store, so that lease cannot tell the worker it is caught up.
        self._refused = 0
        self._troubled = False  # the store failed us last time (logged once until it works)

    @property
    def free_lanes(self) -> int:
        """Attempt slots with nothing ready for them: this many may be leased whatever the shared
        lease buffer holds, so no backlog of other targets ever keeps this one waiting."""
        return max(0, self.concurrency - self.in_flight - len(self._ready) - self._held - self.reserved)

    def claim(self, count: int) -> bool:
        """Take ``count`` new deliveries straight from intake, if that keeps their order."""
        room = self.concurrency * LEASE_AHEAD - len(self._ready) - self._held - self.reserved
        if self._stopping or not self.caught_up or count > room:
            self.caught_up = False  # they go through the store, behind what is there
            self._refused += 1
            return False
        self.reserved += count
        return True

    def take(self, leases: Sequence[Lease], reserved: int) -> None:
        self.reserved -= reserved
        if leases:
            self._admit(leases)

    def _admit(self, leases: Sequence[Lease]) -> None:
        """Leased deliveries, oldest first: ready, or behind the one of their key ready or in flight."""
        ready, now = self._ready, 0.0
        late: list[Lease] = []
        for lease in leases:
            key = lease.okey
            if key is None:
                ready.append(lease)
                continue
            if key in self._blocked:
                now = now or time.time()
                if self._blocked[key] > now:  # leased just before its key's retry was stored
                    late.append(lease)
                    continue
                del self._blocked[key]
            followers = self._followers.get(key)
            if followers is None:
                self._followers[key] = collections.deque()
                ready.append(lease)
                continue
            self._held += 1
            if followers and followers[-1].delivery_id > lease.delivery_id:  # a replayed dead letter
                bisect.insort(followers, lease, key=lambda held: held.delivery_id)
            else:
                followers.append(lease)
        if late:
            self._give_back(late, max(self._blocked[lease.okey] for lease in late if lease.okey))
        self._start_lanes()

    def _give_back(self, leases: Sequence[Lease], until: float) -> None:
        """Leases not to attempt now: pending in the store again, due at ``until``."""
        self._track(self.dispatcher.store.hold(leases, until))
        self.dispatcher.release(len(leases))
        self._need_more.set()

    def _done(self, lease: Lease, retry_at: float | None) -> None:
        """``lease``'s attempt ended: the next of its key is ready, or (a retry) they all wait."""
        key = lease.okey
        if key is None:
            return
        if retry_at is not None:
            self._blocked[key] = retry_at
            followers = self._followers.pop(key)
            if followers:
                self._held -= len(followers)
                self._give_back(followers, retry_at)
            return
        followers = self._followers[key]
        if followers:
            self._held -= 1
            self._ready.append(followers.popleft())
        else:
            del self._followers[key]

    def _start_lanes(self) -> None:
        """A lane per leased delivery, up to ``concurrency``: an idle target runs none."""
        if self._group is None or self._stopping:
            return
        while self._lanes < min(self.concurrency, len(self._ready)):
            self._lanes += 1
            self._group.create_task(self._lane())

    def wake(self) -> None:
        """Deliveries of this target were stored pending: lease them before taking any more
        from intake (a handover now would overtake them)."""
        self.caught_up = False
        self._refused += 1
        self._wake.set()

    def stop(self) -> None:
        """Stop leasing and starting attempts; attempts under way finish (bounded by the dispatcher)."""
        self._stopping = True
        self._wake.set()
        self._need_more.set()
        self.dispatcher.stop_waiting(self)

    async def run(self) -> None:
        """One leaser keeps a buffer of leased deliveries; ``concurrency`` lanes attempt them.

        Leasing ahead of the lanes lets the next lease overlap with attempts under way. What is
        leased but not attempted when the process stops is pending again at the next start.
        """
        async with asyncio.TaskGroup() as group:
            self._group = group
            self._start_lanes()  # for what intake handed over before this ran
            await self._lease_loop()

    async def _lease_loop(self) -> None:
        store = self.dispatcher.store
        if self._nothing_stored and not self._wake.is_set():
            self.caught_up = True  # intake may hand new deliveries straight over
            await self._sleep_until(None)
        while not self._stopping:
            room = self.concurrency * LEASE_AHEAD - len(self._ready) - self._held - self.reserved
            if len(self._ready) >= self.concurrency or room <= 0 or (room < self.concurrency and self._ready):
                self._need_more.clear()  # enough to do; lease again in batches, not one by one
                await self._need_more.wait()
                continue
            want = self.dispatcher.reserve(room, floor=self.free_lanes)
            if want == 0:  # every target together holds ROUTER_LEASE_BUFFER leased events
                await self.dispatcher.budget_freed(self)
                continue
            self._wake.clear()  # before leasing: a notify during the lease is not lost
            refused = self._refused
            try:
                leases = await store.lease(self.key, want)
            except Exception as exc:  # a full disk, a locked file: wait and lease again
                self.dispatcher.release(want)
                await self._store_trouble(exc)
                continue
            self.dispatcher.release(want - len(leases))
            self._troubled = False
            self.caught_up = len(leases) < want and self._refused == refused
            if leases:
                self._admit(leases)
                continue
            try:
                due_at = await store.next_due(self.key)
            except Exception as exc:
                await self._store_trouble(exc)
                continue
            if due_at is None and self.dispatcher.is_retired(self.key) and not self.busy:
                self.stop()  # removed from the configuration, and nothing is left for it
                return
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
        return bool(self._ready) or self.in_flight > 0 or self.reserved > 0 or self._held > 0

    async def _lane(self) -> None:
        """Attempt leased deliveries until there are none left (or the worker stops)."""
        try:
            await self._attempt_ready()
        finally:
            self._lanes -= 1
        if self._ready and not self._stopping:  # handed over while this lane was finishing
            self._start_lanes()

    async def _attempt_ready(self) -> None:
        ready = self._ready
        while ready and not self._stopping:
            if not self.sink.ready:  # its connection is down: wait for it, not attempt by attempt
                with contextlib.suppress(TimeoutError):  # and look at _stopping now and then
                    await asyncio.wait_for(self.sink.wait_ready(), SINK_WAIT_S)
                continue
            lease = ready.popleft()
            self.dispatcher.release(1)
            if len(ready) < self.concurrency:
                self._need_more.set()
            self.in_flight += 1
            try:
                attempted, retry_at = await self._attempt(lease)
            finally:
                self.in_flight -= 1
            if attempted:
                self._done(lease, retry_at)
                # A slot is free: a leaser waiting for room in the shared buffer may fill it.
                self.dispatcher.stop_waiting(self)
            else:
                ready.appendleft(lease)  # not attempted after all: first again, uncounted
                self.dispatcher.buffered += 1  # held in memory again

    async def _sleep_until(self, due_at: float | None) -> None:
        timeout = None if due_at is None else max(0.0, due_at - time.time())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _attempt(self, lease: Lease) -> tuple[bool, float | None]:
        """Attempt ``lease``: (False, None) when the sink turned out to be unavailable (not an
        attempt); (True, when it is tried again) for a retry; (True, None) once it is done."""
        try:
            return True, await self._attempt_once(lease)
        except Unavailable:
            return False, None
        except Exception:  # a bug here must not stop the other attempts or the daemon
            log.exception("delivery.bug", target=self.key, event_id=lease.event.id)
        return True, None

    async def _attempt_once(self, lease: Lease) -> float | None:
        store = self.dispatcher.store
        target = self.dispatcher.target(self.key)
        started = time.perf_counter()
        status: int | None = None
        outcome, error, retry_at = "delivered", "", None
        try:
            if target is None:
                raise PermanentError(f"target {self.key} is no longer configured")
            status = await self.sink.send(target, lease.event)
        except Unavailable:
            raise  # not the delivery's failure: nothing is recorded, the lane waits for the sink
        except RetryableError as exc:
            status, error = exc.status, logs.scrub(str(exc))
            outcome, error, retry_at = self._retry_or_kill(lease, error, exc.retry_after_s)
        except PermanentError as exc:
            status, error, outcome = exc.status, logs.scrub(str(exc)), "dead"
            self._track(store.kill(lease, error))
        except Exception as exc:  # a bug in a sink must not kill the worker, nor retry forever
            log.exception("delivery.bug", target=self.key, event_id=lease.event.id)
            error = logs.scrub(f"internal error: {type(exc).__name__}: {exc}")
            outcome, error, retry_at = self._retry_or_kill(lease, error, None)
        else:
            store.ack(lease)
        elapsed = time.perf_counter() - started
        elapsed_ms = round(elapsed * 1000, 1)
        latency_s = time.time() - lease.accepted_at if outcome == "delivered" else None
        self.dispatcher.count(self.sink.name, lease.event.event, outcome, elapsed, latency_s)
        if logs.is_enabled("WEBHOOKS"):
            log.info(
                "delivery.attempt",
                kind="WEBHOOKS",
                instance=lease.event.instance,
                _event=lease.event.event,
                event_id=lease.event.id,
                sink=self.sink.name,
                target=self.key,
                **(self.sink.where(target, lease.event) if target else {}),
                attempt=lease.attempts + 1,
                status=status,
                outcome=outcome,
                elapsed_ms=elapsed_ms,
                **({"error": error} if error else {}),
            )
        if outcome == "dead":
            log.error(
                "delivery.dead_letter",
                instance=lease.event.instance,
                _event=lease.event.event,
                event_id=lease.event.id,
                sink=self.sink.name,
                target=self.key,
                attempt=lease.attempts + 1,
                error=error,
            )
        return retry_at

    def _retry_or_kill(
        self, lease: Lease, error: str, retry_after_s: float | None
    ) -> tuple[str, str, float | None]:
        """A failed attempt counts, whatever failed: retried by the policy, or a dead letter.
        Returns the outcome, the error as recorded and when the retry is due (None: dead)."""
        store = self.dispatcher.store
        attempt = lease.attempts + 1
        if attempt >= self.policy.max_attempts:
            error = f"{error} (gave up after {attempt} attempts)"
            self._track(store.kill(lease, error))
            return "dead", error, None
        delay = self.policy.delay_s(attempt)
        if retry_after_s is not None:
            delay = min(retry_after_s, self.policy.max_delay_s)
        retry_at = time.time() + delay
        self._track(store.retry(lease, retry_at, error))
        self._wake.set()  # the leaser recomputes when the next delivery is due
        return f"retry in {delay:.2f}s", error, retry_at

    @staticmethod
    def _track(future: asyncio.Future[Any]) -> None:
        """Store writes are not awaited (at-least-once tolerates a lost ack); failures are logged."""

        def done(f: asyncio.Future[Any]) -> None:
            if not f.cancelled() and f.exception() is not None:
                log.error("store.write_failed", error=str(f.exception()))

        future.add_done_callback(done)


class Dispatcher:
    """Owns one worker per target and tells them when new deliveries are stored."""

    def __init__(
        self,
        store: Store,
        sinks: Mapping[str, BaseSink],
        current: Current,
        settings: Settings,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.sinks = sinks
        self.current = current
        self._applied = current.routes  # the routes the workers were last set up for
        self.settings = settings
        self.workers: dict[str, TargetWorker] = {}
        self.counters: dict[tuple[str, str], int] = {}
        self.metrics = metrics
        # Targets a reload removed: their workers deliver what is already stored for them, then stop.
        self.retired: dict[str, Target] = {}
        self._group: asyncio.TaskGroup | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopped = asyncio.Event()
        # Leased but not yet attempted, across all targets: bounded, so memory is too.
        self.buffer_limit = settings.router_lease_buffer
        self.buffered = 0
        self.handed_over = 0  # deliveries given to workers by intake without a lease query
        self._stored_early: set[str] = set()  # targets given deliveries before their worker ran
        self._started = False  # every worker of the configuration at start is running
        # Workers waiting for room in the buffer, first come first served: a release wakes as
        # many as it freed places, not every worker of every target.
        self._budget_waiters: collections.OrderedDict[TargetWorker, asyncio.Future[None]] = (
            collections.OrderedDict()
        )

    def reserve(self, wanted: int, floor: int = 0) -> int:
        """Take up to ``wanted`` places in the shared lease buffer; return how many. ``floor``
        places are granted even beyond the buffer (a worker's free attempt slots)."""
        granted = max(0, min(wanted, self.buffer_limit - self.buffered), min(wanted, floor))
        self.buffered += granted
        if granted:
            self._wake_next()  # what is left may serve the next in line
        return granted

    def release(self, count: int) -> None:
        if count:
            self.buffered -= count
            self._wake_next()

    def _wake_next(self) -> None:
        """One waiting worker, while there is room: it reserves, and wakes the next if room is
        left. A release never wakes a herd that would find the room taken."""
        while self.buffered < self.buffer_limit and self._budget_waiters:
            _, waiter = self._budget_waiters.popitem(last=False)
            if not waiter.done():
                waiter.set_result(None)
                return

    async def budget_freed(self, worker: TargetWorker) -> None:
        """Until the buffer has room for ``worker`` again (or it stops)."""
        waiter = asyncio.get_running_loop().create_future()
        self._budget_waiters[worker] = waiter
        try:
            await waiter
        finally:
            if self._budget_waiters.get(worker) is waiter:
                del self._budget_waiters[worker]

    def stop_waiting(self, worker: TargetWorker) -> None:
        """``worker`` no longer waits for room in the buffer (it stops, or has a free slot)."""
        waiter = self._budget_waiters.pop(worker, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def count(
        self, sink: str, event: str, outcome: str, seconds: float, latency_s: float | None = None
    ) -> None:
        """One attempt ended: ``delivered`` (``latency_s`` since acceptance), ``retry in ...``, ``dead``."""
        kind = outcome.split(" ", 1)[0]
        key = (sink, kind)
        self.counters[key] = self.counters.get(key, 0) + 1
        if self.metrics is not None:
            self.metrics.attempt(sink, event, "retried" if kind == "retry" else kind, seconds, latency_s)

    def claim(self, counts: Mapping[str, int]) -> frozenset[str]:
        """Targets whose worker takes these new deliveries from intake directly (Handoff)."""
        claimed = set()
        for key, count in counts.items():
            worker = self.workers.get(key)
            if worker is None or (self.buffered + count > self.buffer_limit and count > worker.free_lanes):
                continue
            if worker.claim(count):
                self.buffered += count
                claimed.add(key)
        return frozenset(claimed)

    def hand_over(self, leases: Sequence[Lease], claimed: Mapping[str, int]) -> None:
        by_target: dict[str, list[Lease]] = {key: [] for key in claimed}
        for lease in leases:
            by_target[lease.target].append(lease)
        for key, reserved in claimed.items():
            got = by_target[key]
            self.handed_over += len(got)
            self.workers[key].take(got, reserved)
            self.release(reserved - len(got))  # ids that were duplicates

    def notify(self, keys: Iterable[str]) -> None:
        for key in keys:
            worker = self.workers.get(key)
            if worker is not None:
                worker.wake()
            elif key in self.retired:  # stored by a request that began before the reload
                self._start(key)
            elif not self._started:  # stored before the workers started: this one reads first
                self._stored_early.add(key)

    def target(self, key: str) -> Target | None:
        """The target ``key`` names: configured, or removed but still draining."""
        return self.routes.targets.get(key) or self.retired.get(key)

    def is_retired(self, key: str) -> bool:
        return key in self.retired

    def _start(self, key: str, nothing_stored: bool = False) -> None:
        kind = kind_of(key)
        sink = self.sinks.get(kind.name) if kind is not None else None
        if sink is None or kind is None or self._group is None or key in self.workers:
            # One worker per target: a reload during start-up may have started it already, and a
            # second one would replace the first in ``workers``, which would then never stop.
            # A target of a sink that is not configured has no worker (see ``run``).
            return
        policy, concurrency = kind.policy(self.settings), kind.concurrency(self.settings)
        worker = TargetWorker(key, self, sink, policy, concurrency, nothing_stored=nothing_stored)
        self.workers[key] = worker
        task = self._group.create_task(worker.run(), name=f"worker {key}")
        self._tasks[key] = task

        def forget(_: asyncio.Task[None]) -> None:  # a retired worker that drained its target
            if self.workers.get(key) is worker:
                del self.workers[key], self._tasks[key]

        task.add_done_callback(forget)

    @property
    def routes(self) -> Routes:
        return self.current.routes

    async def apply(self) -> None:
        """Follow the routing index just published in ``current``; start workers for new targets.

        A removed target's deliveries were accepted while it was subscribed, so they are still
        delivered, to the target as it was (this is how ``instance.delete`` reaches the deleted
        instance's own webhook); then its worker stops. After a restart, what is left for a
        target that no longer exists becomes a dead letter saying so.
        """
        previous, routes = self._applied, self.current.routes
        self._applied = routes
        for key, target in previous.targets.items():
            if key not in routes.targets:
                self.retired[key] = target
        for key in routes.targets:
            self.retired.pop(key, None)
            if key not in self.workers:
                self._start(key)
        for key in self.retired:
            if key in self.workers:
                self.workers[key].wake()

    def _sink_missing(self, key: str) -> str | None:
        """Why stored deliveries of ``key`` have no sink to go to, or None when they have one."""
        kind = kind_of(key)
        if kind is None:
            return f"no sink called {key.split(':', 1)[0]!r} exists"
        if kind.name not in self.sinks:
            return f"the {kind.name} sink is not enabled ({kind.name.upper()}_ENABLED is not true)"
        return None

    async def _bury(self, key: str) -> None:
        """Deliveries waiting for a sink that is not configured: dead letters saying so, which
        ``dlq replay`` sends again once the sink is back; never pending for ever."""
        why = self._sink_missing(key)
        count = await self.store.kill_target(key, f"{why}; replay with 'evolution-router dlq replay'")
        if count:
            log.error("delivery.sink_missing", target=key, dead_letters=count, error=why)

    async def _watch_other_writers(self) -> None:
        """Wake every worker when another process (``dlq replay``) changed the database, so
        deliveries it made due are picked up without a signal."""
        while True:
            await asyncio.sleep(EXTERNAL_POLL_S)
            try:
                changed = await self.store.changed_elsewhere()
            except Exception as exc:  # the store's trouble is reported by the workers
                log.debug("dispatcher.poll_failed", error=str(exc))
                continue
            if changed:
                for worker in self.workers.values():
                    worker.wake()

    async def run(self, grace_s: float) -> None:
        """Run every worker until ``stop``; then give attempts under way ``grace_s`` to finish."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            stored = await self.store.pending_targets()
            for key in set(self.routes.targets) | stored:
                if key not in self.routes.targets and self._sink_missing(key) is not None:
                    await self._bury(key)
                else:
                    # A target with nothing stored needs no first lease: it waits, caught up,
                    # for intake (so 10,000 idle targets cost no store queries at start).
                    self._start(key, nothing_stored=key not in stored and key not in self._stored_early)
            self._started = True
            self._stored_early.clear()
            watcher = group.create_task(self._watch_other_writers(), name="external writes")
            await self._stopped.wait()
            watcher.cancel()
            for worker in self.workers.values():
                worker.stop()
            if self._tasks:
                _, late = await asyncio.wait(list(self._tasks.values()), timeout=grace_s)
                for task in late:
                    task.cancel()  # their leases are released at the next start

    def stop(self) -> None:
        self._stopped.set()

    async def idle(self) -> bool:
        """Every due delivery has been attempted: nothing in flight or leased, nothing due in the
        store (retries due later may wait). What has not happened by then will not on its own."""
        if any(worker.busy for worker in self.workers.values()):
            return False
        return await self.store.due_or_leased() == 0
