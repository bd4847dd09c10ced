"""Lanes (``router.lanes``): the targets on one place share its lanes in turn, a slow attempt
stops holding its place, and an idle pool runs nothing. The pool on its own, then the delivery
core and the daemon against real servers on loopback."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Coroutine
from typing import Any

import structlog.testing

from router.events import Event, new_event_id, utc_timestamp
from router.lanes import LanePool
from router.sinks.webhook import WebhookSink, WebhookTarget
from router.store import NewDelivery, Store
from tests.test_delivery_core import delivery_core
from tests.test_http_client import ok, serve  # noqa: F401 - the fixture


class Pools:
    """What the dispatcher gives a pool: a task per lane, counted; told when it is empty."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()
        self.spawned = 0
        self.emptied = 0

    def pool(self, limit: int) -> LanePool:
        return LanePool("host", limit, self.spawn, self.lane_ended, self.empty)

    def spawn(self, lane: Coroutine[Any, Any, None]) -> None:
        self.spawned += 1
        self.tasks.add(asyncio.get_running_loop().create_task(lane))

    def lane_ended(self) -> None:
        self.tasks.discard(asyncio.current_task())  # type: ignore[arg-type]

    def empty(self, pool: LanePool) -> None:
        self.emptied += 1


class Worker:
    """A target with ``items`` to attempt, ``concurrency`` at a time, each attempt ``answer``."""

    def __init__(
        self, key: str, items: int, pool: LanePool, log: list[str], answer: Any = None, concurrency: int = 1
    ) -> None:
        self.key, self.pool, self.log = key, pool, log
        self.items = collections.deque(range(items))
        self.answer = answer if answer is not None else (lambda: asyncio.sleep(0))
        self.concurrency = concurrency
        self.lanes = 0
        self.in_flight = 0

    def start(self) -> None:
        while self.lanes < min(self.concurrency, self.in_flight + len(self.items)):
            self.lanes += 1
            self.pool.want(self)

    @property
    def has_ready(self) -> bool:
        return bool(self.items)

    async def attempt_next(self) -> None:
        item = self.items.popleft()
        self.in_flight += 1
        try:
            await self.answer()
        finally:
            self.in_flight -= 1
        self.log.append(f"{self.key}{item}")

    def lane_left(self) -> None:
        self.lanes -= 1
        self.start()


async def test_many_targets_are_served_by_the_pools_few_lanes():
    """300 targets with an event each, a pool of 4: every event is attempted, never more than 4
    at once, by 4 lane tasks that move from target to target; then no task is left."""
    pools, done = Pools(), []
    pool = pools.pool(limit=4)
    workers = [Worker(f"t{n}-", 1, pool, done) for n in range(300)]
    at_once = {"now": 0, "most": 0}

    async def answer() -> None:
        at_once["now"] += 1
        at_once["most"] = max(at_once["most"], at_once["now"])
        await asyncio.sleep(0)
        at_once["now"] -= 1

    for worker in workers:
        worker.answer = answer
        worker.start()
    async with asyncio.timeout(10):
        while len(done) < 300 or pools.tasks:
            await asyncio.sleep(0.01)
    assert sorted(done) == sorted(f"t{n}-0" for n in range(300))
    assert at_once["most"] == 4
    assert pools.spawned == 4
    assert pools.emptied == 1 and pool.idle


async def test_waiting_targets_take_turns():
    """One lane, a target with five events and another with one that asks after it: the second
    goes after the first's next attempt, not after all five."""
    pools, order = Pools(), []
    pool = pools.pool(limit=1)
    first, second = Worker("a", 5, pool, order), Worker("b", 1, pool, order)
    first.start()
    second.start()
    async with asyncio.timeout(5):
        while len(order) < 6 or pools.tasks:
            await asyncio.sleep(0.01)
    assert order == ["a0", "b0", "a1", "a2", "a3", "a4"]


async def test_a_target_wanting_many_lanes_waits_in_line_once():
    """Two places, a target with a backlog wanting ten lanes, then another target with one event:
    the second is attempted within the next round of turns, not after the first's ten lanes."""
    pools, order = Pools(), []
    pool = pools.pool(limit=2)
    busy, other = Worker("a", 40, pool, order, concurrency=10), Worker("b", 1, pool, order)
    busy.start()
    other.start()
    async with asyncio.timeout(5):
        while len(order) < 41 or pools.tasks:
            await asyncio.sleep(0.01)
    assert order.index("b0") <= 3, order


async def test_an_attempt_that_never_ends_stops_holding_its_place():
    """Every place is held by attempts that never end: the next target is still attempted, after
    about the stall time."""
    pools, done = Pools(), []
    pool = pools.pool(limit=2)
    never = asyncio.get_running_loop().create_future()
    slow = [Worker(f"slow{n}-", 1, pool, done, answer=lambda: asyncio.shield(never)) for n in range(2)]
    fast = Worker("fast", 1, pool, done)
    for worker in [*slow, fast]:
        worker.start()
    async with asyncio.timeout(5):
        while "fast0" not in done:
            await asyncio.sleep(0.005)
    assert [worker.in_flight for worker in slow] == [1, 1]
    never.set_result(None)
    async with asyncio.timeout(5):
        while pools.tasks:
            await asyncio.sleep(0.01)
    assert sorted(done) == ["fast0", "slow0-0", "slow1-0"]
    assert pool.counted == 0 and pool.idle


async def test_a_bug_in_an_attempt_is_logged_and_the_lane_serves_the_others():
    pools, done = Pools(), []
    pool = pools.pool(limit=1)

    async def bug() -> None:
        raise RuntimeError("a bug in the worker")

    broken, healthy = Worker("broken", 1, pool, done, answer=bug), Worker("healthy", 3, pool, done)
    with structlog.testing.capture_logs() as logged:
        broken.start()
        healthy.start()
        async with asyncio.timeout(5):
            while len(done) < 3 or pools.tasks:
                await asyncio.sleep(0.01)
    assert done == ["healthy0", "healthy1", "healthy2"]
    [line] = [line for line in logged if line["event"] == "delivery.bug"]
    assert line["target"] == "broken" and isinstance(line["exc_info"], RuntimeError)
    assert pool.idle and pool.counted == 0


def webhook_targets(base: str, paths: list[str]) -> dict[str, WebhookTarget]:
    return {
        f"webhook:{path}": WebhookTarget(f"webhook:{path}", path, f"{base}/{path}", False, events=frozenset())
        for path in paths
    }


async def deliver_each(store: Store, dispatcher: Any, keys: list[str]) -> None:
    for key in keys:
        event = Event(new_event_id(), "bot", "call", b"{}", utc_timestamp())
        await store.accept([NewDelivery(event, (key,))])
    dispatcher.notify(keys)


async def test_targets_on_one_host_share_a_few_connections(serve, make_settings, tmp_path):  # noqa: F811
    """The delivery core with the real webhook sink: 300 targets on one host, an event each, over
    a handful of connections (ROUTER_WEBHOOK_HOST_CONCURRENCY=4), every event answered."""
    server, base = await serve(ok)
    settings = make_settings(ROUTER_WEBHOOK_HOST_CONCURRENCY="4")
    targets = webhook_targets(base, [f"i{n}" for n in range(300)])
    store = await Store.open(tmp_path / "router.db")
    async with WebhookSink(settings) as sink, delivery_core(store, sink, targets, settings) as dispatcher:
        await deliver_each(store, dispatcher, list(targets))
        async with asyncio.timeout(30):
            while len(server.requests) < 300 or not await dispatcher.idle():
                await asyncio.sleep(0.02)
    assert sorted(request.split(b" ", 2)[1].decode() for request in server.requests) == sorted(
        f"/i{n}" for n in range(300)
    )
    assert server.connections <= 20  # 4, and a few more should some have stalled on a busy machine


async def test_a_target_on_a_host_whose_places_are_all_held_is_still_served(serve, make_settings, tmp_path):  # noqa: F811
    """Six targets whose requests are never answered hold every place of their host: the next
    target on that host is still answered."""
    server, base = await serve(lambda request: None if b"/slow" in request else ok(request))
    settings = make_settings(ROUTER_WEBHOOK_HOST_CONCURRENCY="2", WEBHOOK_REQUEST_TIMEOUT_MS="60000")
    targets = webhook_targets(base, [*(f"slow{n}" for n in range(6)), "fast"])
    store = await Store.open(tmp_path / "router.db")
    async with WebhookSink(settings) as sink, delivery_core(store, sink, targets, settings) as dispatcher:
        await deliver_each(store, dispatcher, [key for key in targets if "slow" in key])
        async with asyncio.timeout(10):
            while sum(b"/slow" in request for request in server.requests) < 2:
                await asyncio.sleep(0.01)
        await deliver_each(store, dispatcher, ["webhook:fast"])
        async with asyncio.timeout(10):
            while not any(b"/fast" in request for request in server.requests):
                await asyncio.sleep(0.01)


async def test_the_daemon_shares_one_host_among_its_instances_webhooks(receiver, make_settings, tmp_path):
    """300 instances, each with its own webhook on one host, an event each at once: all arrive,
    over far fewer requests at a time than 300 (ROUTER_WEBHOOK_HOST_CONCURRENCY=4)."""
    from tests.conftest import post_ingest, running, wait_idle  # noqa: PLC0415

    instances = tmp_path / "instances"
    for n in range(300):
        (instances / f"i{n}.yaml").write_text(f"webhook: {{enabled: true, url: '{receiver.url}/{n}'}}\n")
    at_once = {"now": 0, "most": 0}
    handle = receiver.handle

    async def counting(request):
        at_once["now"] += 1
        at_once["most"] = max(at_once["most"], at_once["now"])
        try:
            await asyncio.sleep(0)  # a turn of the loop, so requests under way overlap
            return await handle(request)
        finally:
            at_once["now"] -= 1

    receiver.handle = counting
    async with running(make_settings(ROUTER_WEBHOOK_HOST_CONCURRENCY="4"), start_timeout=60) as app:
        events = [{"event": "call", "instance": f"i{n}", "data": {"n": n}} for n in range(300)]
        assert (await post_ingest(app, events))[0] == 202
        got = await receiver.wait_for(300, timeout=60)
        await wait_idle(app, timeout=60)
    assert sorted(int(request.path[1:]) for request in got) == list(range(300))
    assert at_once["most"] < 100, at_once


def test_the_stall_time_follows_the_usual_attempt_time_but_not_the_stalled_ones():
    """10 ms at the least; four times the usual time of the attempts that ended before they
    stalled; an attempt that stalled does not raise it."""
    from router.lanes import STALL_FLOOR_S, _Attempt  # noqa: PLC0415

    pool = Pools().pool(limit=4)
    assert pool.stall_s == STALL_FLOOR_S
    for _ in range(400):  # answers of 20 ms, each ended by a lane that holds its place
        assert pool._ended_attempt(_Attempt(started=0.0), now=0.02)
    assert 0.079 < pool.stall_s <= 0.08
    before = pool.stall_s
    stalled = _Attempt(started=0.0)
    stalled.counted = False  # the stall watch took its place away
    pool._ended_attempt(stalled, now=30.0)  # a 30 s answer
    assert pool.stall_s == before
