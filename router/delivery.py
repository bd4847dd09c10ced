"""The dispatcher: one delivery worker per target (``router.worker``), told when new deliveries
are stored, and the shared budget of deliveries leased ahead of their attempt.

Workers start with the configuration and with every reload that adds a target; a target a
reload removed keeps its worker until what was stored for it is delivered.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Coroutine, Hashable, Iterable, Mapping, Sequence
from typing import Any

from router import logs
from router.attempt import Attempts
from router.current import Current
from router.lanes import LanePool
from router.metrics import Metrics
from router.retry import RetryPolicy
from router.routing import Routes, Target
from router.settings import Settings
from router.sinks import BaseSink, SinkKind
from router.sinks.registry import kind_of
from router.store import Lease, QueueStore
from router.worker import TargetWorker

log = logs.get_logger("router.delivery")
EXTERNAL_POLL_S = 2.0  # how often the dispatcher looks for writes by other processes


class Dispatcher:
    """Owns one worker per target and tells them when new deliveries are stored."""

    def __init__(
        self,
        store: QueueStore,
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
        self.attempts = Attempts(store, self.target, self.count)  # how each attempt ends
        # Targets a reload removed: their workers deliver what is already stored for them, then stop.
        self.retired: dict[str, Target] = {}
        self._group: asyncio.TaskGroup | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # the workers' leasers and lanes
        self._pools: dict[Hashable, LanePool] = {}  # lanes, by the place their targets share
        self._stopped = asyncio.Event()
        # Leased but not yet attempted, across all targets: bounded, so memory is too.
        self.buffer_limit = settings.router_lease_buffer
        self.buffered = 0
        self.handed_over = 0  # deliveries given to workers by intake without a lease query
        self._stored_early: set[str] = set()  # targets given deliveries before their worker ran
        self._started = False  # the targets with deliveries stored at start have their workers
        self._policies: dict[str, tuple[RetryPolicy, int]] = {}  # sink -> its policy, concurrency
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
            worker = self.workers.get(key)  # every configured target has one once started
            if worker is None:
                if not self._started:  # stored pending before the workers start: its worker reads
                    self._stored_early.add(key)  # first (intake's notice may come after its start)
                continue
            if self.buffered + count > self.buffer_limit and count > worker.free_lanes:
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

    @property
    def started(self) -> bool:
        return self._started

    def notify(self, keys: Iterable[str]) -> None:
        for key in keys:
            worker = self.workers.get(key)
            if worker is not None:
                worker.wake()
            elif not self._started:  # stored before the workers started: this one reads first
                self._stored_early.add(key)
            elif key in self.retired or key in self.routes.targets:
                self._start(key)  # (a removed one: stored by a request begun before the reload)

    def target(self, key: str) -> Target | None:
        """The target ``key`` names: configured, or removed but still draining."""
        return self.routes.targets.get(key) or self.retired.get(key)

    def is_retired(self, key: str) -> bool:
        return key in self.retired

    def _start(self, key: str, nothing_stored: bool = False) -> TargetWorker | None:
        kind = kind_of(key)
        sink = self.sinks.get(kind.name) if kind is not None else None
        if sink is None or kind is None or self._group is None or key in self.workers:
            # One worker per target: a reload during start-up may have started it already, and a
            # second one would replace the first in ``workers``, which would then never stop.
            # A target of a sink that is not configured has no worker (see ``run``).
            return self.workers.get(key)
        policy, concurrency = self._policies.get(kind.name) or self._policy_of(kind)
        worker = TargetWorker(key, self, sink, policy, concurrency, nothing_stored=nothing_stored)
        self._place_of(worker)
        self.workers[key] = worker
        if not nothing_stored:  # one with nothing stored has no task until it has work
            worker.wake()
        return worker

    def _policy_of(self, kind: SinkKind) -> tuple[RetryPolicy, int]:
        """A sink's retry policy and concurrency, made once (10,000 targets: 10,000 workers)."""
        self._policies[kind.name] = found = kind.policy(self.settings), kind.concurrency(self.settings)
        return found

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run a worker's leaser; at stop, it and the lanes are given the grace period to end."""
        task = asyncio.get_running_loop().create_task(self._guarded(work), name=name)
        self._tasks.add(task)
        return task

    def pool_of(self, worker: TargetWorker) -> LanePool:
        """The lanes ``worker``'s target shares with the others that reach the same place (a
        webhook host), or its own."""
        key, limit = worker.place or self._place_of(worker)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = LanePool(key, limit, self._spawn_lane, self._lane_ended, self._emptied)
        return pool

    def _place_of(self, worker: TargetWorker) -> tuple[Hashable, int]:
        """Where ``worker``'s lanes come from, and how many that place runs: worked out when the
        worker is made (during the start, for every configured target) and after a reload."""
        target = self.target(worker.key)
        shared = worker.sink.shares(target) if target is not None else None
        worker.place = shared if shared is not None else (worker.key, worker.concurrency)
        return worker.place

    def _spawn_lane(self, lane: Coroutine[Any, Any, None]) -> None:
        """Run a lane, which calls ``_lane_ended`` itself as it ends (no wrapper, no callback)."""
        self._tasks.add(asyncio.get_running_loop().create_task(lane, name="lane"))

    def _lane_ended(self) -> None:
        self._tasks.discard(asyncio.current_task())

    def _emptied(self, pool: LanePool) -> None:
        """``pool`` runs no lane and nobody waits: an idle place costs nothing."""
        if self._pools.get(pool.key) is pool:
            del self._pools[pool.key]
        pool.close()

    async def _guarded(self, work: Coroutine[Any, Any, None]) -> None:
        """``work``, its end noted without a done callback."""
        task = asyncio.current_task()
        assert task is not None
        try:
            await work
        except Exception as exc:  # a bug: say so, go on
            log.error("delivery.bug", task=task.get_name(), exc_info=exc)
        finally:
            self._tasks.discard(task)

    def forget(self, worker: TargetWorker) -> None:
        """``worker`` stopped: its target was removed, and everything stored for it is done."""
        if self.workers.get(worker.key) is worker and worker.key in self.retired:
            del self.workers[worker.key]

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
        for worker in self.workers.values():
            worker.place = None  # a target's URL may have moved it to another host's lanes
        for key, target in previous.targets.items():
            if key not in routes.targets:
                self.retired[key] = target
        for key in routes.targets.keys() - previous.targets.keys():
            self.retired.pop(key, None)
            # Another router sharing the database may have stored some already: look once.
            self._start(key)
        for key in self.retired:
            leaving = self.workers.get(key)
            if leaving is None:
                continue
            if leaving.idle:  # nothing stored for it, nothing in hand: nothing to finish
                leaving.stop()
                del self.workers[key]
            else:
                leaving.wake()  # it delivers what is stored, then stops

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

    def _due_elsewhere(self, key: str | None) -> None:
        """The store says deliveries of ``key`` (None: of any target) became due elsewhere."""
        if key is None:
            for worker in self.workers.values():
                worker.wake()
        else:
            self.notify([key])

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
            await self.store.changed_elsewhere()  # from here on, another process's writes wake us
            self.store.subscribe(self._due_elsewhere)  # and so do other routers' (PostgreSQL)
            # Targets with something stored get a worker that leases it now.
            for key in await self.store.pending_targets():
                if key not in self.routes.targets and self._sink_missing(key) is not None:
                    await self._bury(key)
                else:
                    self._start(key)
            # The others get an idle one (no task, no query, about a kilobyte): made during the
            # start, it is out of the collector's way once the daemon runs (``router.cli``), and
            # the first events of 10,000 instances do not each make one.
            for key in self.routes.targets:
                if key not in self.workers and key not in self._stored_early:
                    self._start(key, nothing_stored=True)
            self._started = True
            for key in self._stored_early:
                self._start(key)
            self._stored_early.clear()
            watcher = group.create_task(self._watch_other_writers(), name="external writes")
            await self._stopped.wait()
            watcher.cancel()
            for worker in self.workers.values():
                worker.stop()
            if self._tasks:
                _, late = await asyncio.wait(list(self._tasks), timeout=grace_s)
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
