"""The RabbitMQ sink seen through a TCP proxy the test controls: in an outage one connection is
re-opened with backoff, deliveries wait for it without attempts, errors or log lines of their
own; on each connection a queue is declared once."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from router.app import database_path
from tests.conftest import free_port, post_ingest, running, wait_idle, write_instance
from tests.test_amqp_client import Proxy
from tests.test_rabbitmq import broker, rabbitmqctl, upsert  # noqa: F401 - the fixture


async def test_an_outage_costs_one_connection_attempt_at_a_time_and_no_attempts(
    broker,  # noqa: F811
    make_settings,
    tmp_path,
    capsys,
):
    proxy = Proxy(down=True)
    queue = broker.subscribe(tmp_path / "instances")
    env = broker.env(RABBITMQ_URI=f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
    async with proxy:
        async with running(make_settings(**env)) as app:
            events = [
                {"event": "messages.upsert", "instance": broker.instance, "data": {"n": n}}
                for n in range(300)
            ]
            assert (await post_ingest(app, events))[0] == 202
            async with asyncio.timeout(20):  # the broker stays away for several reconnects
                while proxy.attempts < 4:
                    await asyncio.sleep(0.05)
            path = database_path(app.settings)
            with sqlite3.connect(path) as conn:
                errors = conn.execute("SELECT COUNT(*) FROM attempt_errors").fetchone()[0]
                attempted = conn.execute("SELECT COUNT(*) FROM deliveries WHERE attempts > 0").fetchone()[0]
            assert (errors, attempted) == (0, 0), "waiting for the broker is not a failed attempt"
            tried = proxy.attempts
            assert tried < 20, f"{tried} connection attempts for 300 deliveries: a storm"
            proxy.down = False
            got = await broker.consume(queue, 300)
        assert sorted(orjson.loads(m.body)["data"]["n"] for m in got) == list(range(300))
    lines = capsys.readouterr().out
    assert lines.count("rabbitmq.unreachable") == 1, "one line for the outage, not one per attempt"
    assert lines.count("rabbitmq.connected") == 1


async def test_closing_ends_the_connection_keeper_even_when_a_connect_eats_the_cancellation(
    make_settings, monkeypatch
):
    """Python 3.11's ``asyncio.wait_for`` (inside client libraries too) can turn a cancellation
    into the connect's own failure; the keeper must end at shutdown all the same, not retry on."""
    from router.sinks.rabbitmq import amqp  # noqa: PLC0415
    from router.sinks.rabbitmq.client import RabbitmqSink  # noqa: PLC0415

    attempts = 0

    async def connect(uri: str) -> None:
        nonlocal attempts
        attempts += 1
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:  # what a lost cancellation looks like from outside
            raise ConnectionRefusedError("connect failed") from None

    monkeypatch.setattr(amqp, "connect", connect)
    settings = make_settings(
        RABBITMQ_ENABLED="true", RABBITMQ_URI=f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    )
    sink = RabbitmqSink(settings)
    await sink.open()
    async with asyncio.timeout(10):
        while attempts == 0:
            await asyncio.sleep(0.01)
        await sink.aclose()  # returns: the keeper does not connect again
    assert attempts == 1


async def test_a_broker_that_stops_answering_costs_the_connection_not_the_event(
    broker,  # noqa: F811
    make_settings,
    tmp_path,
    monkeypatch,
    capsys,
):
    """No heartbeats asked for, and the broker's host goes silent: the declaration or publish
    left unanswered gives the connection up after ANSWER_TIMEOUT_S; the event goes out on the next."""
    from router.sinks.rabbitmq import client  # noqa: PLC0415

    monkeypatch.setattr(client, "ANSWER_TIMEOUT_S", 1.0)
    monkeypatch.setattr(client, "WATCH_S", 0.1)
    queue = broker.subscribe(tmp_path / "instances")
    silent = Proxy()
    env = broker.env(RABBITMQ_URI=f"amqp://guest:guest@127.0.0.1:{silent.port}/?heartbeat=0")
    async with silent, running(make_settings(**env)) as app:
        sink = app.dispatcher.sinks["rabbitmq"]  # type: ignore[union-attr]
        async with asyncio.timeout(10):
            await sink.wait_ready()
        silent.freeze()
        assert (
            await post_ingest(app, [{"event": "messages.upsert", "instance": broker.instance, "data": {}}])
        )[0] == 202
        [got] = await broker.consume(queue, 1)
    assert got.header.properties.message_id
    lines = capsys.readouterr().out
    assert "rabbitmq.disconnected" in lines and "no answer from the broker in 1 s" in lines


async def test_a_broker_in_a_resource_alarm_is_waited_for_not_given_up(
    broker,  # noqa: F811
    make_settings,
    tmp_path,
    monkeypatch,
    capsys,
):
    """A memory alarm blocks publishers (Connection.Blocked): the unconfirmed publish waits out
    the alarm, longer than ANSWER_TIMEOUT_S, on the same connection, and arrives after it."""
    from router.sinks.rabbitmq import client  # noqa: PLC0415

    monkeypatch.setattr(client, "ANSWER_TIMEOUT_S", 1.0)
    monkeypatch.setattr(client, "WATCH_S", 0.1)
    queue = broker.subscribe(tmp_path / "instances")
    watermark = rabbitmqctl("eval", "vm_memory_monitor:get_vm_memory_high_watermark().").strip()
    async with running(make_settings(**broker.env())) as app:
        sink = app.dispatcher.sinks["rabbitmq"]  # type: ignore[union-attr]
        event = {"event": "messages.upsert", "instance": broker.instance, "data": {}}
        assert (await post_ingest(app, [event]))[0] == 202  # the queues are declared before the alarm
        await broker.consume(queue, 1)
        connection = sink._connection
        await asyncio.to_thread(rabbitmqctl, "set_vm_memory_high_watermark", "0.0000001")
        try:
            assert (await post_ingest(app, [event]))[0] == 202
            async with asyncio.timeout(20):
                while not (
                    connection.blocked and connection.waited_s(asyncio.get_running_loop().time()) == 0
                ):
                    await asyncio.sleep(0.05)
            blocked_at = time.monotonic()
            async with asyncio.timeout(20):  # three times ANSWER_TIMEOUT_S blocked, at least
                while time.monotonic() - blocked_at < 3 * client.ANSWER_TIMEOUT_S:
                    assert sink._connection is connection and not connection.is_closed
                    await asyncio.sleep(0.1)
        finally:
            await asyncio.to_thread(rabbitmqctl, "set_vm_memory_high_watermark", watermark)
        await broker.consume(queue, 1)
        assert sink._connection is connection, "the same connection, never given up"
    assert "rabbitmq.disconnected" not in capsys.readouterr().out


def methods_sent(sent: bytes) -> list[tuple[int, int]]:
    """The (class, method) of each method frame in the bytes a client sent over its connections
    one after another (each opens with the protocol header): Queue.Declare is (50, 10),
    Queue.Bind (50, 20)."""
    return [(class_id, method_id) for _, class_id, method_id in frames_sent(sent)]


def frames_sent(sent: bytes) -> list[tuple[int, int, int]]:
    """(channel, class, method) of each method frame in ``sent`` (see ``methods_sent``);
    Basic.Publish is (60, 40)."""
    pieces, _ = split_frames(sent)
    return [
        (int.from_bytes(p[1:3], "big"), int.from_bytes(p[7:9], "big"), int.from_bytes(p[9:11], "big"))
        for p in pieces
        if p[0] == 1
    ]


def split_frames(data: bytes) -> tuple[list[bytes], bytes]:
    """The whole pieces at the start of bytes a client sent (the protocol header opening each
    connection, then frames), and what is left: the start of a frame not all there yet."""
    pieces, at = [], 0
    while at < len(data):
        if data[at : at + 4] == b"AMQP":
            end = at + 8
        elif len(data) - at < 7:
            break
        else:
            end = at + 8 + int.from_bytes(data[at + 3 : at + 7], "big")
        if end > len(data):
            break
        pieces.append(data[at:end])
        at = end
    return pieces, data[at:]


async def test_a_queue_is_declared_once_however_many_attempts_want_it_first(
    broker,  # noqa: F811
    make_settings,
    tmp_path,
):
    """64 deliveries of as many conversations start together on a fresh connection (at start, and
    after the connection was lost): one of them declares and binds the queue, the others wait for
    it rather than each asking the broker."""
    queue = broker.subscribe(tmp_path / "instances")
    proxy = Proxy()
    env = broker.env(RABBITMQ_URI=f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
    got: list[Any] = []
    async with proxy, running(make_settings(**env)) as app:
        for start in (0, 200):
            numbers = range(start, start + 200)
            events = [
                {
                    "event": "messages.upsert",
                    "instance": broker.instance,
                    "data": {"n": n, "key": {"remoteJid": f"c{n}"}},
                }
                for n in numbers
            ]
            assert (await post_ingest(app, events))[0] == 202
            got += await broker.consume(queue, 200)
            await wait_idle(app)
            for writer in proxy.writers:  # the connection is lost; the next one declares again
                writer.transport.abort()
    assert sorted(orjson.loads(m.body)["data"]["n"] for m in got) == list(range(400))
    sent = methods_sent(bytes(proxy.sent))
    assert (sent.count((50, 10)), sent.count((50, 20))) == (2, 2), (
        "a Queue.Declare and a Queue.Bind per connection"
    )


@dataclass
class HoldingProxy(Proxy):
    """Holds the client's ``Queue.Declare`` of queue ``queue`` on its way to the broker, and every
    frame after it on that channel (the broker works through a channel's frames in order), until
    ``release``: a broker slow to create that queue."""

    queue: str = ""
    holding: set[int] = field(default_factory=set)  # channels whose frames are held
    held: list[tuple[asyncio.StreamWriter, bytes]] = field(default_factory=list)
    rest: bytes = b""  # the start of a frame not all received yet

    def forward(self, data: bytes, upstream: asyncio.StreamWriter) -> None:
        pieces, self.rest = split_frames(self.rest + data)
        passing = []
        for piece in pieces:
            channel = int.from_bytes(piece[1:3], "big")
            declares = piece[0] == 1 and piece[7:11] == b"\x00\x32\x00\x0a"  # Queue.Declare
            if declares and piece[14 : 14 + piece[13]] == self.queue.encode():
                self.holding.add(channel)
            if piece[0] != ord("A") and channel in self.holding:  # not the protocol header
                self.held.append((upstream, piece))
            else:
                passing.append(piece)
        upstream.write(b"".join(passing))

    def release(self) -> None:
        self.queue = ""
        self.holding.clear()
        for upstream, frame in self.held:
            upstream.write(frame)
        self.held.clear()


async def test_a_queue_the_broker_is_slow_to_create_holds_up_no_other_queue(
    broker,  # noqa: F811
    make_settings,
    tmp_path,
):
    """One instance's new queue is being created (the broker holds its declaration); meanwhile an
    instance whose queue exists, and another whose queue is new too, get their events."""
    instances = tmp_path / "instances"
    ready = broker.subscribe(instances)
    slow, new = f"{broker.instance}-slow", f"{broker.instance}-new"
    for name in (slow, new):
        write_instance(instances, name, "rabbitmq: {enabled: true, events: [MESSAGES_UPSERT]}\n")
    proxy = HoldingProxy(queue=f"{slow}.messages.upsert")
    env = broker.env(RABBITMQ_URI=f"amqp://guest:guest@127.0.0.1:{proxy.port}/")

    def upserts(instance: str, numbers: range) -> list[dict[str, object]]:
        return [upsert(instance, n) for n in numbers]

    async with proxy, running(make_settings(**env)) as app:
        assert (await post_ingest(app, upserts(broker.instance, range(1))))[0] == 202
        await broker.consume(ready, 1)
        assert (await post_ingest(app, upserts(slow, range(1))))[0] == 202
        async with asyncio.timeout(10):
            while not proxy.held:
                await asyncio.sleep(0.01)
        more = upserts(broker.instance, range(1, 6)) + upserts(new, range(3))
        assert (await post_ingest(app, more))[0] == 202
        got_ready = await broker.consume(ready, 5, timeout=10)
        got_new = await broker.consume(f"{new}.messages.upsert", 3, timeout=10)
        assert proxy.held, "the slow queue's declaration is still held"
        proxy.release()
        got_slow = await broker.consume(f"{slow}.messages.upsert", 1)
    assert [orjson.loads(m.body)["data"]["n"] for m in got_ready] == [1, 2, 3, 4, 5]
    assert [orjson.loads(m.body)["data"]["n"] for m in got_new] == [0, 1, 2]
    assert orjson.loads(got_slow[0].body)["instance"] == slow
    assert methods_sent(bytes(proxy.sent)).count((50, 10)) == 3, "each queue declared once"


async def test_new_queues_are_declared_several_at_once_on_channels_events_are_not_published_on(
    broker,  # noqa: F811
    make_settings,
    tmp_path,
):
    """20 instances' first events at once: their 20 new queues are declared on at most 8
    channels, more than one at a time, and no event is published on a declaring channel."""
    instances = [f"{broker.instance}-{n}" for n in range(20)]
    for name in instances:
        write_instance(tmp_path / "instances", name, "rabbitmq: {enabled: true, events: [MESSAGES_UPSERT]}\n")
    proxy = Proxy()
    env = broker.env(RABBITMQ_URI=f"amqp://guest:guest@127.0.0.1:{proxy.port}/")
    async with proxy, running(make_settings(**env)) as app:
        assert (await post_ingest(app, [upsert(name, 1) for name in instances]))[0] == 202
        await wait_idle(app)
        got = [await broker.consume(f"{name}.messages.upsert", 1) for name in instances]
    assert [len(one) for one in got] == [1] * 20
    frames = frames_sent(bytes(proxy.sent))
    declaring = {channel for channel, *method in frames if method == [50, 10]}
    publishing = {channel for channel, *method in frames if method == [60, 40]}
    assert sum(method == [50, 10] for _, *method in frames) == 20, "each queue declared once"
    assert 1 < len(declaring) <= 8, declaring
    assert not declaring & publishing
