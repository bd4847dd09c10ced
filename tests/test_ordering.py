"""Order per conversation: deliveries that share an ordering key go one at a time, oldest first;
other keys keep flowing. Receivers here answer slowly and fail at random."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from router.cluster import open_store
from router.current import Current
from router.deadletters import Selection, replay
from router.delivery import Dispatcher
from router.events import Event, new_event_id, utc_timestamp
from router.keyqueue import MAX_FOLLOWERS, KeyQueue
from router.ordering import chat_of, ordering_key
from router.routing import Routes
from router.sinks.webhook import WebhookTarget
from router.sinks.webhook.client import WebhookSink
from router.store import Lease, NewDelivery, Store
from router.worker import LEASE_AHEAD
from tests.conftest import API_KEY, Receiver, hook_env, post_ingest, running, wait_idle

pytestmark = pytest.mark.usefixtures("backend")  # each test runs on SQLite and on PostgreSQL

FAST_RETRY = {
    "WEBHOOK_RETRY_INITIAL_DELAY_SECONDS": "0.02",
    "WEBHOOK_RETRY_MAX_DELAY_SECONDS": "0.1",
    "WEBHOOK_RETRY_MAX_ATTEMPTS": "1000",
}


def message(n: int, chat: str, instance: str = "bot") -> dict[str, Any]:
    return {
        "event": "messages.upsert",
        "instance": instance,
        "data": {"n": n, "key": {"remoteJid": chat, "id": f"M{n}"}},
    }


class Tracking:
    """Wraps a receiver: counts requests under way and answers as ``decide(body)`` says.

    With ``gate`` set, the first requests wait (up to a few seconds) until that many are under
    way at once, so a router that may overlap them is seen to."""

    def __init__(self, receiver: Receiver, decide: Callable[[dict[str, Any]], int]) -> None:
        self.receiver, self.decide = receiver, decide
        self.under_way = 0
        self.most = 0
        self.gate = 0
        self.delivered: list[dict[str, Any]] = []  # bodies answered 200, in answer order
        self.original = receiver.handle
        receiver.handle = self.handle  # type: ignore[method-assign]

    async def handle(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        changed = self.receiver.changed
        async with changed:
            self.under_way += 1
            self.most = max(self.most, self.under_way)
            changed.notify_all()
            if self.most < self.gate:
                try:
                    async with asyncio.timeout(3):
                        await changed.wait_for(lambda: self.most >= self.gate)
                except TimeoutError:
                    pass
        await asyncio.sleep(random.uniform(0, 0.004))
        status = self.decide(body)
        async with changed:
            self.under_way -= 1
            if status == 200:
                self.delivered.append(body)
            changed.notify_all()
        return web.Response(status=status)

    def order_by_chat(self) -> dict[str, list[int]]:
        chats: dict[str, list[int]] = {}
        for body in self.delivered:
            chats.setdefault(body["data"]["key"]["remoteJid"], []).append(body["data"]["n"])
        return chats


async def wait_delivered(tracking: Tracking, count: int, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        async with tracking.receiver.changed:
            await tracking.receiver.changed.wait_for(lambda: len(tracking.delivered) >= count)


def test_each_event_names_its_conversation():
    assert chat_of("messages.upsert", {"key": {"remoteJid": "5511@s.whatsapp.net"}}) == "5511@s.whatsapp.net"
    assert chat_of("messages.update", {"remoteJid": "g1@g.us", "keyId": "X"}) == "g1@g.us"
    assert chat_of("presence.update", {"id": "5511@s.whatsapp.net", "presences": {}}) == "5511@s.whatsapp.net"
    assert chat_of("chats.upsert", [{"remoteJid": "a@s"}, {"remoteJid": "b@s"}]) == "a@s"
    assert chat_of("chats.delete", ["a@s", "b@s"]) == "a@s"
    assert chat_of("group-participants.update", {"id": "g@g.us", "action": "add"}) == "g@g.us"
    assert chat_of("labels.association", {"chatId": "c@s", "labelId": "1"}) == "c@s"
    # Events about the instance as a whole, whatever their data holds.
    assert chat_of("connection.update", {"state": "open", "id": "x"}) is None
    assert chat_of("qrcode.updated", {"qrcode": {"code": "2@x"}}) is None
    assert chat_of("call", {"id": "call-1", "from": "a@s"}) is None
    assert chat_of("messages.upsert", {"key": {}}) is None
    assert chat_of("messages.upsert", "text") is None
    assert ordering_key("chat", "bot", "c@s") == "bot\nc@s"
    assert ordering_key("chat", "bot", None) == ordering_key("instance", "bot", "c@s") == "bot"
    assert ordering_key("none", "bot", "c@s") is None


def test_the_key_queue_lets_one_delivery_of_a_key_go_at_a_time():
    event = Event("e", "bot", "messages.upsert", b"{}", utc_timestamp())

    def lease(delivery_id: int, key: str | None) -> Lease:
        return Lease(delivery_id, "webhook:global", 0, event, 0.0, key)

    queue = KeyQueue()
    a1, a2, b1, a3, free = lease(1, "a"), lease(2, "a"), lease(3, "b"), lease(5, "a"), lease(4, None)
    assert queue.admit([a1, a2, b1, free]) == ({}, [])
    assert list(queue.ready) == [a1, b1, free] and queue.held == 1  # a2 waits behind a1
    queue.ready.clear()  # all three are attempted
    assert queue.finished(a1) is None and list(queue.ready) == [a2]
    queue.ready.clear()
    assert queue.retried(a2, 99.0) == []  # a2 waits for its retry
    # a3 was read before that retry was stored: it goes back, due with a2, until a2 is back.
    assert queue.admit([a3]) == ({99.0: [a3]}, [])
    assert queue.admit([a2, a3]) == ({}, []) and list(queue.ready) == [a2] and queue.held == 1
    queue.ready.clear()
    assert queue.finished(a2) is None and list(queue.ready) == [a3]
    assert queue.finished(b1) is None and queue.finished(free) is None and len(queue) == 1


def test_a_busy_key_parks_what_is_over_its_share_and_gets_it_back_in_order():
    event = Event("e", "bot", "messages.upsert", b"{}", utc_timestamp())
    many = [Lease(n, "webhook:global", 0, event, 0.0, "busy") for n in range(1, MAX_FOLLOWERS + 6)]
    queue = KeyQueue()
    late, park = queue.admit(many)
    assert late == {} and list(queue.ready) == many[:1] and queue.held == MAX_FOLLOWERS
    assert park == many[MAX_FOLLOWERS + 1 :] and queue.parking  # the rest wait in the store
    other = Lease(100, "webhook:global", 0, event, 0.0, "other")
    assert queue.admit([other]) == ({}, []) and list(queue.ready) == [many[0], other]
    queue.ready.clear()
    for done in many[:MAX_FOLLOWERS]:
        assert queue.finished(done) is None  # the next of the key is ready
    assert queue.finished(many[MAX_FOLLOWERS]) == "busy"  # its share is done: unpark the rest
    later = Lease(200, "webhook:global", 0, event, 0.0, "busy")
    assert queue.admit([later]) == ({}, [later])  # read meanwhile: parked too, behind them
    queue.unparked("busy", None)
    assert queue.parking  # the one parked meanwhile is still there
    assert queue.admit(park) == ({}, [])  # the unparked ones come back first, in order
    queue.unparked("busy", None)  # (the next batch: nothing left)


async def test_the_store_holds_a_key_back_behind_its_retry_across_a_restart(tmp_path):
    path = tmp_path / "router.db"
    target = "webhook:global"

    def new(chat: str) -> NewDelivery:
        event = Event(new_event_id(), "bot", "messages.upsert", b"{}", utc_timestamp(), chat=chat)
        return NewDelivery(event, (target,), (f"bot\n{chat}",))

    store = await Store.open(path)
    task = asyncio.create_task(store.run())
    a1, a2, b1 = new("a"), new("a"), new("b")
    await store.accept([a1, a2, b1])
    first = await store.lease(target, 1)
    assert [lease.event.id for lease in first] == [a1.event.id]
    later = time.time() + 60
    await store.retry(first[0], later, "HTTP 500")
    a3 = new("a")
    await store.accept([a3], leased_targets=frozenset({target}))  # behind a1 too, never handed over
    leased = await store.lease(target, 10)
    assert [lease.event.id for lease in leased] == [b1.event.id], "a2 and a3 wait for a1's retry"
    await store.close()
    await task
    store.shutdown()

    store = await Store.open(path)  # a restart: what was held back still is
    task = asyncio.create_task(store.run())
    try:
        assert [lease.event.id for lease in await store.lease(target, 10)] == [b1.event.id]
        a4 = new("a")
        await store.accept([a4])
        assert await store.lease(target, 10) == []
        due = await store.lease(target, 10, now=later + 1)
        assert [lease.event.id for lease in due] == [e.event.id for e in (a1, a2, a3, a4)]
    finally:
        await store.close()
        await task
        store.shutdown()


async def test_each_chat_arrives_in_order_through_slow_answers_and_random_failures(receiver, make_settings):
    """The delivery core alone: store, dispatcher, worker and the real webhook sink."""
    rng = random.Random(7)
    tracking = Tracking(receiver, lambda body: 500 if rng.random() < 0.3 else 200)
    settings = make_settings(**hook_env(receiver, **FAST_RETRY))
    store = await open_store(settings, "test-node")  # this test's backend: SQLite or PostgreSQL
    store_task = asyncio.create_task(store.run())
    target = WebhookTarget("webhook:global", None, f"{receiver.url}/hook", False, events=frozenset())
    async with WebhookSink(settings) as sink:
        dispatcher = Dispatcher(
            store, {"webhook": sink}, Current(Routes(targets={target.key: target})), settings
        )
        running_task = asyncio.create_task(dispatcher.run(grace_s=1))
        try:
            chats = [f"55119{c}@s.whatsapp.net" for c in range(6)]
            for n in range(240):
                chat = chats[n % 6]
                event = Event(
                    new_event_id(),
                    "bot",
                    "messages.upsert",
                    orjson.dumps(message(n, chat)["data"]),
                    utc_timestamp(),
                    chat=chat,
                )
                await store.accept([NewDelivery(event, (target.key,), (f"bot\n{chat}",))])
                dispatcher.notify([target.key])
            await wait_delivered(tracking, 240)
        finally:
            dispatcher.stop()
            await running_task
            await store.close()
            await store_task
            store.shutdown()
    order = tracking.order_by_chat()
    assert order == {chat: list(range(c, 240, 6)) for c, chat in enumerate(chats)}
    assert tracking.most > 1, "chats went in parallel"


async def test_a_failing_chat_does_not_hold_up_the_others(receiver, make_settings):
    broken = {"on": True}

    def decide(body: dict[str, Any]) -> int:
        return 503 if broken["on"] and body["data"]["key"]["remoteJid"] == "bad" else 200

    tracking = Tracking(receiver, decide)
    settings = make_settings(**hook_env(receiver, **FAST_RETRY))
    async with running(settings) as app:
        events = [message(n, "bad" if n % 4 == 0 else f"ok{n % 4}") for n in range(120)]
        assert (await post_ingest(app, events))[0] == 202
        await wait_delivered(tracking, 90)  # every other chat's, while "bad" keeps failing
        assert "bad" not in tracking.order_by_chat()
        broken["on"] = False
        await wait_delivered(tracking, 120)
        await wait_idle(app)
    order = tracking.order_by_chat()
    assert order["bad"] == list(range(0, 120, 4))
    for k in (1, 2, 3):
        assert order[f"ok{k}"] == list(range(k, 120, 4))


async def test_ordering_none_uses_every_slot_and_instance_orders_across_chats(receiver, make_settings):
    tracking = Tracking(receiver, lambda body: 200)

    async def most_at_once(ordering: str) -> int:
        tracking.most, tracking.delivered = 0, []
        tracking.gate = {"instance": 0, "chat": 2, "none": 3}[ordering]
        settings = make_settings(**hook_env(receiver, ROUTER_WEBHOOK_ORDERING=ordering))
        async with running(settings) as app:
            events = [message(n, f"c{n % 2}") for n in range(40)]
            assert (await post_ingest(app, events))[0] == 202
            await wait_delivered(tracking, 40)
            await wait_idle(app)
        if ordering != "none":
            key = "bot" if ordering == "instance" else None
            for chat, numbers in tracking.order_by_chat().items():
                assert numbers == list(range(int(chat[1]), 40, 2)), (key, chat)
        return tracking.most

    assert await most_at_once("instance") == 1, "one instance, one request at a time"
    assert await most_at_once("chat") == 2, "one request per chat at a time, the chats in parallel"
    assert await most_at_once("none") >= 3, "no order kept: every slot in use"


async def test_order_holds_across_a_kill_and_a_restart(receiver, daemon):
    rng = random.Random(11)
    tracking = Tracking(receiver, lambda body: 500 if rng.random() < 0.2 else 200)
    env = hook_env(receiver, **FAST_RETRY)
    first = daemon(**env)
    first.start()
    await first.wait_ready()
    chats = [f"c{k}" for k in range(4)]
    events = [message(n, chats[n % 4]) for n in range(400)]
    async with aiohttp.ClientSession(headers={"apikey": API_KEY}) as session:
        for start in range(0, 400, 50):
            url = f"http://127.0.0.1:{first.port}/ingest"
            async with session.post(url, json=events[start : start + 50]) as answer:
                assert answer.status == 202
    await wait_delivered(tracking, 60)
    first.kill()  # mid-stream: some deliveries leased, some waiting for a retry
    second = daemon(**env)
    second.start()
    await second.wait_ready()

    def unique() -> int:
        return len({body["id"] for body in tracking.delivered})

    async with asyncio.timeout(60):
        async with receiver.changed:
            await receiver.changed.wait_for(lambda: unique() >= 400)
    await second.terminate()
    for k, chat in enumerate(chats):
        got = tracking.order_by_chat()[chat]
        firsts = list(dict.fromkeys(got))  # at-least-once: the event in flight at the kill may repeat
        assert firsts == list(range(k, 400, 4)), chat
        assert len(got) - len(firsts) <= 1, f"{chat}: only the last in-flight event repeats"


async def test_a_slow_conversation_with_a_backlog_does_not_hold_up_the_others(receiver, make_settings):
    """One chat's receiver path hangs with hundreds of that chat's events waiting, more than the
    worker keeps leased ahead: the other chats' events, accepted after them, still arrive."""
    release, hanging = asyncio.Event(), asyncio.Event()
    original = receiver.handle

    async def holding(request: web.Request) -> web.Response:
        if orjson.loads(await request.read())["data"]["key"]["remoteJid"] == "slow":
            hanging.set()
            await release.wait()
        return await original(request)

    receiver.handle = holding  # type: ignore[method-assign]
    settings = make_settings(**hook_env(receiver, ROUTER_WEBHOOK_CONCURRENCY="4"))
    backlog = 4 * LEASE_AHEAD + 100  # more than the worker holds in memory
    async with running(settings) as app:
        try:
            slow_events = [message(n, "slow") for n in range(backlog)]
            for start in range(0, backlog, 500):
                assert (await post_ingest(app, slow_events[start : start + 500]))[0] == 202
            await asyncio.wait_for(hanging.wait(), 10)  # the slow chat's first request hangs
            others = [message(n, f"c{n % 3}") for n in range(backlog, backlog + 30)]
            assert (await post_ingest(app, others))[0] == 202
            got = await receiver.wait_for(30)
            assert {r.json()["data"]["key"]["remoteJid"] for r in got} == {"c0", "c1", "c2"}
        finally:
            release.set()
        await receiver.wait_for(backlog + 30, timeout=60)
        await wait_idle(app)
    slow = [
        r.json()["data"]["n"] for r in receiver.requests if r.json()["data"]["key"]["remoteJid"] == "slow"
    ]
    assert slow == list(range(backlog)), "the slow chat in order, once each"


async def test_parked_deliveries_count_as_waiting_and_are_pending_after_a_restart(tmp_path):
    path, target = tmp_path / "router.db", "webhook:global"
    store = await Store.open(path)
    task = asyncio.create_task(store.run())
    new = [
        NewDelivery(Event(new_event_id(), "bot", "call", b"{}", utc_timestamp()), (target,), ("bot",))
        for _ in range(5)
    ]
    await store.accept(new)
    leases = await store.lease(target, 5)
    await store.park(leases[2:])
    assert await store.due_or_leased() == 5, "parked ones are not done: the router is not idle"
    assert (await store.counts())["pending"] == 5
    assert await store.unpark(target, "bot", 1) == leases[3].delivery_id  # the oldest left parked
    assert [lease.delivery_id for lease in await store.lease(target, 5)] == [leases[2].delivery_id]
    await store.close()
    await task
    store.shutdown()
    store = await Store.open(path)  # a restart: leased and parked ones are pending, in order
    task = asyncio.create_task(store.run())
    try:
        again = await store.lease(target, 5)
        assert [lease.delivery_id for lease in again] == [lease.delivery_id for lease in leases]
    finally:
        await store.close()
        await task
        store.shutdown()


async def test_a_dead_letter_releases_its_key_and_a_replay_comes_after_what_went_on(receiver, make_settings):
    receiver.script("/hook", [404])  # the chat's first event is refused for good: a dead letter
    settings = make_settings(**hook_env(receiver))
    async with running(settings) as app:
        assert (await post_ingest(app, [message(n, "c") for n in range(3)]))[0] == 202
        await receiver.wait_for(3)  # 0 (refused), then 1 and 2: the key went on
        assert await asyncio.to_thread(replay, settings.queue, Selection(instance="bot")) == 1
        got = await receiver.wait_for(4)
    assert [(r.json()["data"]["n"]) for r in got] == [0, 1, 2, 0]
