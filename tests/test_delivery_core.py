"""The delivery core on its own (store, dispatcher, workers) with an in-memory sink."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import structlog.testing

from router import worker as worker_module
from router.current import Current
from router.deadletters import dead_letters, show
from router.delivery import Dispatcher
from router.errors import Unavailable
from router.events import Event, new_event_id, utc_timestamp
from router.routing import Routes
from router.settings import Settings
from router.sinks import BaseSink
from router.sinks.webhook import WebhookTarget
from router.store import NewDelivery, Store
from router.worker import LEASE_AHEAD, LEASE_BATCH


@contextlib.asynccontextmanager
async def delivery_core(
    store: Store,
    sink: BaseSink,
    targets: dict[str, WebhookTarget],
    settings: Settings,
    dispatcher: Dispatcher | None = None,
) -> AsyncIterator[Dispatcher]:
    """``store`` and a dispatcher for ``targets`` (made here, or ``dispatcher``) running,
    stopped and closed afterwards."""
    store_task = asyncio.create_task(store.run())
    if dispatcher is None:
        dispatcher = Dispatcher(store, {sink.name: sink}, Current(Routes(targets=targets)), settings)
    running = asyncio.create_task(dispatcher.run(grace_s=1))
    try:
        yield dispatcher
    finally:
        dispatcher.stop()
        await running
        await store.close()
        await store_task
        store.shutdown()


class BrokenSink(BaseSink):
    """A sink with a bug: every attempt raises something that is not a delivery error."""

    name = "webhook"

    def __init__(self) -> None:
        self.attempts = 0

    async def send(self, target: object, event: Event) -> int | None:
        self.attempts += 1
        raise RuntimeError("a bug in the sink")


async def test_an_unexpected_error_counts_as_an_attempt_and_ends_as_a_dead_letter(make_settings, tmp_path):
    settings = make_settings(WEBHOOK_RETRY_MAX_ATTEMPTS="3", WEBHOOK_RETRY_INITIAL_DELAY_SECONDS="0.01")
    path = tmp_path / "router.db"
    store = await Store.open(path)
    target = WebhookTarget("webhook:global", None, "http://127.0.0.1:9/x", False, events=frozenset({"call"}))
    sink = BrokenSink()
    async with delivery_core(store, sink, {target.key: target}, settings) as dispatcher:
        event = Event(new_event_id(), "bot", "call", b"{}", utc_timestamp())
        await store.accept([NewDelivery(event, (target.key,))])
        dispatcher.notify([target.key])
        async with asyncio.timeout(10):
            while (await store.counts())["dead"] == 0:
                await asyncio.sleep(0.02)
    assert sink.attempts == 3, "retried by the policy, then given up: never forever"
    [dead] = dead_letters(Path(path))
    shown = show(Path(path), dead["id"])
    assert shown["last_error"] == "internal error: RuntimeError: a bug in the sink (gave up after 3 attempts)"
    assert [error["attempt"] for error in shown["errors"]] == [1, 2, 3]


class FlakySink(BaseSink):
    """Says it is ready, then finds its connection gone (``Unavailable``) at once, without
    waiting for anything, until its own callback has reconnected: that callback must get to run."""

    name = "webhook"

    def __init__(self) -> None:
        self.connected = True
        self.tries = 0
        self.delivered: list[str] = []

    def _reconnect(self) -> None:
        self.connected = True

    async def send(self, target: object, event: Event) -> int | None:
        self.tries += 1
        if self.tries == 1:  # the connection is lost as the first attempt starts
            self.connected = False
            asyncio.get_running_loop().call_soon(self._reconnect)
        if not self.connected:
            raise Unavailable("the connection was lost")
        self.delivered.append(event.id)
        return None


async def test_a_sink_unavailable_without_waiting_does_not_hold_the_loop(make_settings, tmp_path):
    store = await Store.open(tmp_path / "router.db")
    target = WebhookTarget("webhook:global", None, "http://127.0.0.1:9/x", False, events=frozenset({"call"}))
    sink = FlakySink()
    async with delivery_core(store, sink, {target.key: target}, make_settings()) as dispatcher:
        event = Event(new_event_id(), "bot", "call", b"{}", utc_timestamp())
        await store.accept([NewDelivery(event, (target.key,))])
        dispatcher.notify([target.key])
        async with asyncio.timeout(10):
            while not sink.delivered:
                await asyncio.sleep(0.02)
            while not await dispatcher.idle():
                await asyncio.sleep(0.02)
    assert sink.delivered == [event.id]
    assert sink.tries < 10, "the lane tried again and again without letting the sink reconnect"


class ReadyBugSink(BaseSink):
    """A sink with a bug outside any attempt: asking whether it is ready raises, once."""

    name = "webhook"

    def __init__(self) -> None:
        self.raised = False
        self.delivered: list[str] = []

    @property  # type: ignore[override]
    def ready(self) -> bool:
        if not self.raised:
            self.raised = True
            raise RuntimeError("a bug in the sink's ready")
        return True

    async def send(self, target: object, event: Event) -> int | None:
        self.delivered.append(event.id)
        return None


async def test_a_bug_outside_an_attempt_is_logged_and_delivery_goes_on(make_settings, tmp_path):
    """A lane that dies of a bug is reported with its traceback; the dispatcher and the other
    deliveries carry on (the delivery it was about to attempt goes with the next lane)."""
    store = await Store.open(tmp_path / "router.db")
    target = WebhookTarget("webhook:global", None, "http://127.0.0.1:9/x", False, events=frozenset({"call"}))
    sink = ReadyBugSink()
    with structlog.testing.capture_logs() as logged:
        async with delivery_core(store, sink, {target.key: target}, make_settings()) as dispatcher:
            first, second = (Event(new_event_id(), "bot", "call", b"{}", utc_timestamp()) for _ in range(2))
            await store.accept([NewDelivery(first, (target.key,))])
            dispatcher.notify([target.key])
            async with asyncio.timeout(10):
                while not any(line["event"] == "delivery.bug" for line in logged):
                    await asyncio.sleep(0.02)
            await store.accept([NewDelivery(second, (target.key,))])
            dispatcher.notify([target.key])
            async with asyncio.timeout(10):
                while len(sink.delivered) < 2 or not await dispatcher.idle():
                    await asyncio.sleep(0.02)
    assert sink.delivered == [first.id, second.id]
    [bug] = [line for line in logged if line["event"] == "delivery.bug"]
    assert isinstance(bug["exc_info"], RuntimeError) and "ready" in str(bug["exc_info"])


def instance_webhooks(count: int) -> dict[str, WebhookTarget]:
    """``count`` instance webhooks (``i0``, ``i1`` ...) subscribed to ``call``, by key."""
    return {
        f"webhook:instance:i{n}": WebhookTarget(
            f"webhook:instance:i{n}", f"i{n}", "http://127.0.0.1:9/x", False, events=frozenset({"call"})
        )
        for n in range(count)
    }


class CountingStore(Store):
    """The SQLite store, counting the reads a worker makes to find work."""

    reads = 0
    limits: list[int]

    async def lease(self, target: str, limit: int, now: float | None = None, exclusive: bool = False):  # type: ignore[no-untyped-def]
        self.reads += 1
        self.limits = [*getattr(self, "limits", []), limit]
        return await super().lease(target, limit, now, exclusive)

    async def next_due(self, target: str) -> float | None:
        self.reads += 1
        return await super().next_due(target)


class CountingSink(BaseSink):
    name = "webhook"

    def __init__(self) -> None:
        self.delivered: list[str] = []

    async def send(self, target: object, event: Event) -> int | None:
        self.delivered.append(event.id)
        return None


async def test_caught_up_targets_ask_the_store_nothing_for_what_intake_hands_them(make_settings, tmp_path):
    """200 targets that once had stored work (leased, delivered) and are caught up since: new
    events, one each, handed over by intake, are delivered without a single lease or due-time
    query (10,000 such targets would be 20,000 queries per event each)."""
    store = await CountingStore.open(tmp_path / "router.db")
    targets = instance_webhooks(200)
    sink = CountingSink()

    def batch() -> list[NewDelivery]:
        return [
            NewDelivery(Event(new_event_id(), f"i{n}", "call", b"{}", utc_timestamp()), (key,))
            for n, key in enumerate(targets)
        ]

    async with delivery_core(store, sink, targets, make_settings()) as dispatcher:

        async def delivered(count: int) -> None:
            async with asyncio.timeout(10):
                while len(sink.delivered) < count or not await dispatcher.idle():
                    await asyncio.sleep(0.01)

        async with asyncio.timeout(10):
            while not dispatcher.started:
                await asyncio.sleep(0.01)
        await store.accept(batch())  # stored pending: each worker leases its event
        dispatcher.notify(targets)
        await delivered(200)
        reads = store.reads
        for round_no in range(1, 4):
            counts = {key: 1 for key in targets}
            claimed = dispatcher.claim(counts)
            assert claimed == set(targets), "every caught-up worker takes its event from intake"
            stored = await store.accept(batch(), None, claimed)
            dispatcher.hand_over(stored.leases, counts)
            await delivered(200 * (round_no + 1))
    assert len(set(sink.delivered)) == 800
    assert reads >= 200, "the stored events were leased"
    assert store.reads == reads, f"{store.reads - reads} store reads for 600 deliveries handed over"


class StoreAcceptingDuringStart(Store):
    """Commits ``late`` right after the dispatcher's start has read which targets have something
    stored: accepted while the daemon starts, its intake's notice still to come."""

    late: Sequence[NewDelivery] = ()

    async def pending_targets(self) -> set[str]:
        found = await super().pending_targets()
        await self.accept(self.late)
        return found


async def test_an_event_stored_while_the_workers_start_is_not_overtaken(make_settings, tmp_path):
    """An event accepted while the daemon starts, before its target has a worker, is stored
    pending. The worker made during the start reads it before it takes a newer one of the same
    key from intake, even when intake's notice of the first comes after the second's claim (a
    session's connection.update, then its QR codes)."""
    targets = instance_webhooks(1)
    [key] = targets
    sink = CountingSink()
    first, second = (Event(new_event_id(), "i0", "call", b"{}", utc_timestamp()) for _ in range(2))
    store = await StoreAcceptingDuringStart.open(tmp_path / "router.db")
    dispatcher = Dispatcher(store, {sink.name: sink}, Current(Routes(targets=targets)), make_settings())
    assert dispatcher.claim({key: 1}) == set(), "no worker yet: it goes through the store"
    store.late = [NewDelivery(first, (key,), ("i0",))]
    async with delivery_core(store, sink, targets, make_settings(), dispatcher) as dispatcher:
        async with asyncio.timeout(10):
            while not dispatcher.started:
                await asyncio.sleep(0.01)
        claimed = dispatcher.claim({key: 1})
        stored = await store.accept([NewDelivery(second, (key,), ("i0",))], None, claimed)
        dispatcher.hand_over(stored.leases, {key: 1} if claimed else {})
        dispatcher.notify([key] if claimed else [key, key])  # the first's notice, late; the second's
        async with asyncio.timeout(10):
            while len(sink.delivered) < 2 or not await dispatcher.idle():
                await asyncio.sleep(0.01)
    assert sink.delivered == [first.id, second.id]


async def test_every_target_has_an_idle_worker_and_a_reload_drops_idle_ones(make_settings, tmp_path):
    """200 configured targets: a worker each once started, with no task and no store query; an
    event handed over to one is delivered by it; a reload that removes half of them drops their
    idle workers at once, again without a query."""
    store = await CountingStore.open(tmp_path / "router.db")
    targets = instance_webhooks(200)
    sink = CountingSink()
    async with delivery_core(store, sink, targets, make_settings()) as dispatcher:
        async with asyncio.timeout(10):
            while not dispatcher.started:
                await asyncio.sleep(0.01)
        assert set(dispatcher.workers) == set(targets)
        assert not [task for task in asyncio.all_tasks() if task.get_name().startswith("worker ")]
        first = dispatcher.workers["webhook:instance:i0"]
        event = Event(new_event_id(), "i0", "call", b"{}", utc_timestamp())
        counts = {"webhook:instance:i0": 1}
        assert dispatcher.claim(counts) == set(counts)
        stored = await store.accept([NewDelivery(event, tuple(counts))], None, frozenset(counts))
        dispatcher.hand_over(stored.leases, counts)
        async with asyncio.timeout(10):
            while sink.delivered != [event.id] or not await dispatcher.idle():
                await asyncio.sleep(0.01)
        kept = dict(list(targets.items())[:100])
        dispatcher.current.routes = Routes(targets=kept)
        await dispatcher.apply()
        assert set(dispatcher.workers) == set(kept), "the removed idle targets' workers are gone"
        assert dispatcher.workers["webhook:instance:i0"] is first
    assert store.reads == 0, f"{store.reads} store reads for targets with nothing stored"


class HeldSink(CountingSink):
    """Attempts wait until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def send(self, target: object, event: Event) -> int | None:
        await self.release.wait()
        return await super().send(target, event)


def call_events(count: int, instance: str = "bot") -> list[Event]:
    return [Event(new_event_id(), instance, "call", b"{}", utc_timestamp()) for _ in range(count)]


async def test_a_burst_that_fits_in_memory_is_handed_over_and_a_backlog_is_read_in_batches(
    make_settings, tmp_path
):
    """Concurrency 16: a caught-up worker takes LEASE_AHEAD x 16 deliveries from intake while its
    attempts hang, and refuses the next; what it refused is leased from the store, no more than
    LEASE_BATCH per read, and everything is delivered, once."""
    store = await CountingStore.open(tmp_path / "router.db")
    target = WebhookTarget("webhook:global", None, "http://127.0.0.1:9/x", False, events=frozenset({"call"}))
    sink = HeldSink()
    settings = make_settings(ROUTER_WEBHOOK_CONCURRENCY="16")
    held = 16 * LEASE_AHEAD
    assert held > LEASE_BATCH, "a backlog it may hold takes more than one read"
    async with delivery_core(store, sink, {target.key: target}, settings) as dispatcher:
        async with asyncio.timeout(10):
            while not dispatcher.started:
                await asyncio.sleep(0.01)
        sent: list[Event] = []
        for size in (held // 2, held // 2, 17):  # (held, and 16 attempts under way at most)
            events = call_events(size)
            claimed = dispatcher.claim({target.key: size})
            stored = await store.accept([NewDelivery(e, (target.key,)) for e in events], None, claimed)
            dispatcher.hand_over(stored.leases, {target.key: size} if claimed else {})
            if not claimed:
                dispatcher.notify([target.key])
            assert bool(claimed) == (size != 17), f"{len(sent)} held, {size} more"
            sent += events
        backlog = call_events(LEASE_BATCH + 500)  # stored pending, behind the one refused
        await store.accept([NewDelivery(e, (target.key,)) for e in backlog])
        dispatcher.notify([target.key])
        sent += backlog
        assert store.reads == 0, "nothing was read while the worker held the burst"
        sink.release.set()
        async with asyncio.timeout(30):
            while len(sink.delivered) < len(sent) or not await dispatcher.idle():
                await asyncio.sleep(0.02)
    assert sorted(sink.delivered) == sorted(e.id for e in sent), "once each"
    assert store.limits and max(store.limits) <= LEASE_BATCH, store.limits


async def test_a_worker_holds_at_most_hold_bytes_of_event_data(make_settings, tmp_path, monkeypatch):
    """Events that carry media are large: a worker takes them from intake only while what it
    holds is under HOLD_BYTES (here 1 MiB; 32 KiB events, far fewer than its count allows),
    and the rest waits in the store, leased back no more than fits. All are delivered once,
    and its account ends at zero."""
    monkeypatch.setattr(worker_module, "HOLD_BYTES", 1024 * 1024)
    store = await CountingStore.open(tmp_path / "router.db")
    target = WebhookTarget("webhook:global", None, "http://127.0.0.1:9/x", False, events=frozenset({"call"}))
    sink = HeldSink()
    data = b'"' + b"x" * (32 * 1024 - 2) + b'"'
    sent: list[Event] = []
    refused_at = None
    async with delivery_core(store, sink, {target.key: target}, make_settings()) as dispatcher:
        async with asyncio.timeout(10):
            while not dispatcher.started:
                await asyncio.sleep(0.01)
        for _ in range(20):  # 20 batches of 8: 5 MiB in all
            events = [Event(new_event_id(), "bot", "call", data, utc_timestamp()) for _ in range(8)]
            claimed = dispatcher.claim({target.key: 8})
            worker = dispatcher.workers[target.key]
            if not claimed and refused_at is None:
                refused_at = worker.held_bytes
            stored = await store.accept([NewDelivery(e, (target.key,)) for e in events], None, claimed)
            dispatcher.hand_over(stored.leases, {target.key: 8} if claimed else {})
            if not claimed:
                dispatcher.notify([target.key])
            sent += events
        assert refused_at is not None, "every batch was taken into memory"
        assert 1024 * 1024 <= refused_at <= 1024 * 1024 + 8 * len(data)
        sink.release.set()
        async with asyncio.timeout(30):
            while len(sink.delivered) < len(sent) or not await dispatcher.idle():
                await asyncio.sleep(0.02)
        assert worker.held_bytes == 0
    assert sorted(sink.delivered) == sorted(e.id for e in sent), "once each"
    assert store.limits, "what intake did not hand over was leased"
    assert max(store.limits) <= 1024 * 1024 // len(data), f"a lease read more than fits: {store.limits}"


async def test_idle_targets_run_no_lanes_and_busy_ones_end_theirs(receiver, make_settings, tmp_path):
    """An attempt lane exists only while its target has deliveries in hand: 300 idle webhooks
    cost an idle worker each (made at start, with no task), not a task per unit of concurrency."""
    from tests.conftest import post_ingest, running, wait_idle, write_instance  # noqa: PLC0415

    for n in range(300):
        write_instance(
            tmp_path / "instances", f"i{n}", f"webhook: {{enabled: true, url: '{receiver.url}/{n}'}}\n"
        )
    async with running(make_settings(ROUTER_WEBHOOK_CONCURRENCY="64")) as app:
        async with asyncio.timeout(10):
            while not app.dispatcher.started:  # type: ignore[union-attr]
                await asyncio.sleep(0.01)
        await wait_idle(app)
        workers = dict(app.dispatcher.workers)  # type: ignore[union-attr]
        assert sorted(workers) == sorted(f"webhook:instance:i{n}" for n in range(300))
        assert not any(worker.busy for worker in workers.values())
        idle_tasks = len(asyncio.all_tasks())
        assert idle_tasks < 100, idle_tasks  # a task a target would be 300, 64 lanes each 19,200
        events = [{"event": "call", "instance": f"i{n % 3}", "data": {"n": n}} for n in range(90)]
        assert (await post_ingest(app, events))[0] == 202
        await receiver.wait_for(90)
        await wait_idle(app)
        assert app.dispatcher.workers == workers, "the workers made at start delivered them"  # type: ignore[union-attr]
        lanes = [t for t in asyncio.all_tasks() if t.get_name() == "lane"]
        assert lanes == [], "lanes end when their work is done"
        async with asyncio.timeout(10):  # and so do the workers' own tasks, once their lanes have
            while any(t.get_name().startswith("worker ") for t in asyncio.all_tasks()):
                await asyncio.sleep(0.01)
        more = [{"event": "call", "instance": "i7", "data": {"n": n}} for n in range(90, 95)]
        assert (await post_ingest(app, more))[0] == 202  # an idle target's task runs again
        await receiver.wait_for(95)


async def test_ten_thousand_instances_start_and_deliver(receiver, make_settings, tmp_path):
    """A correctness test with generous timeouts, not a timing threshold (`make bench` measures)."""
    from tests.conftest import post_ingest, running, wait_idle  # noqa: PLC0415

    instances = tmp_path / "instances"
    for n in range(10_000):
        (instances / f"i{n}.yaml").write_text(f"webhook: {{enabled: true, url: '{receiver.url}/{n}'}}\n")
    async with running(make_settings(), start_timeout=60) as app:
        assert len(app.instances) == 10_000
        picks = [0, 4321, 9999]
        events = [{"event": "call", "instance": f"i{n}", "data": {"n": n}} for n in picks]
        assert (await post_ingest(app, events))[0] == 202
        got = await receiver.wait_for(3, timeout=60)
        await wait_idle(app, timeout=60)
    assert sorted(request.path for request in got) == ["/0", "/4321", "/9999"]
