"""The RabbitMQ sink against the broker on 127.0.0.1:5672, checked by an independent consumer."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiormq
import orjson
import pytest
from aiormq.abc import DeliveredMessage

from router.app import database_path
from router.deadletters import dead_letters
from router.instances import load_instances
from tests.conftest import post_ingest, running, wait_idle, write_instance

URI = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass
class Broker:
    """Names unique to one test, and a consumer; everything declared is deleted afterwards."""

    exchange: str
    prefix: str
    instance: str
    channel: aiormq.abc.AbstractChannel

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "RABBITMQ_ENABLED": "true",
            "RABBITMQ_URI": URI,
            "RABBITMQ_EXCHANGE_NAME": self.exchange,
            "RABBITMQ_PREFIX_KEY": self.prefix,
            "ROUTER_QUEUE_RETRY_INITIAL_DELAY_S": "0.2",
            "ROUTER_QUEUE_RETRY_MAX_DELAY_S": "1",
            **extra,
        }

    def subscribe(self, instances_dir: Path) -> str:
        """An instance file for this test's instance with RabbitMQ on for messages.upsert."""
        write_instance(instances_dir, self.instance, "rabbitmq: {enabled: true, events: [MESSAGES_UPSERT]}\n")
        return f"{self.instance}.messages.upsert"

    async def reconnect(self) -> None:
        """After the broker dropped every connection, the consumer's included."""
        self.channel = await (await aiormq.connect(URI)).channel()

    async def wait_queue(self, queue: str, timeout: float = 15) -> None:
        """Until the router has declared ``queue`` (a failed declare closes its channel)."""
        async with asyncio.timeout(timeout):
            while True:
                probe = await self.channel.connection.channel()
                try:
                    await probe.queue_declare(queue, passive=True)
                    await probe.close()
                    return
                except aiormq.exceptions.ChannelNotFoundEntity:
                    await asyncio.sleep(0.05)

    async def consume(self, queue: str, count: int, timeout: float = 30) -> list[DeliveredMessage]:
        """The first ``count`` messages of ``queue`` (acknowledged), in the order they came."""
        await self.wait_queue(queue)
        got: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
        for attempt in range(1, 6):
            try:
                ok = await self.channel.basic_consume(queue, got.put, no_ack=True)
                break
            except aiormq.exceptions.ConnectionInternalError:
                # RabbitMQ 3.10 answers a passive declare from the queue's metadata, but a consume
                # needs the quorum queue's Raft member; while that is (re)starting the broker
                # fails with {error,noproc} and closes the connection (541). Reconnect, retry.
                if attempt == 5:
                    raise
                await self.reconnect()
        try:
            async with asyncio.timeout(timeout):
                return [await got.get() for _ in range(count)]
        finally:
            await self.channel.basic_cancel(ok.consumer_tag)

    async def depth(self, queue: str) -> int:
        declared = await self.channel.queue_declare(queue, passive=True)
        return int(declared.message_count or 0)


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, check=True, timeout=120
    ).stdout


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    tag = uuid.uuid4().hex[:8]
    connection = await aiormq.connect(URI)
    channel = await connection.channel()
    made = Broker(exchange=f"ex-{tag}", prefix=f"p{tag}", instance=f"bot{tag}", channel=channel)
    yield made
    cleanup = await (await aiormq.connect(URI)).channel()  # the test may have lost its own
    for line in rabbitmqctl("list_queues", "name", "--quiet", "--no-table-headers").splitlines():
        if tag in line:
            await cleanup.queue_delete(line.strip())
    for line in rabbitmqctl("list_exchanges", "name", "--quiet", "--no-table-headers").splitlines():
        if tag in line:  # the test's exchange, and instances' own (upstream's topology)
            await cleanup.exchange_delete(line.strip())
    await cleanup.connection.close()
    if not connection.is_closed:
        await connection.close()


def upsert(instance: str, n: int) -> dict[str, object]:
    return {"event": "messages.upsert", "instance": instance, "data": {"n": n}}


async def test_instance_queue_gets_the_envelope_with_its_properties(broker, make_settings, tmp_path):
    broker.subscribe(tmp_path / "instances")
    settings = make_settings(**broker.env(SERVER_URL="http://gw:8080"))
    async with running(settings) as app:
        payloads = [
            {**upsert(broker.instance, n), "id": f"id-{n}", "date_time": "2023-12-01T10:30:00.000Z"}
            for n in range(5)
        ]
        payloads.append({"event": "connection.update", "instance": broker.instance, "data": {}})
        assert (await post_ingest(app, payloads))[0] == 202
        queue = f"{broker.instance}.messages.upsert"
        got = await broker.consume(queue, 5)
    assert [orjson.loads(m.body)["data"]["n"] for m in got] == [0, 1, 2, 3, 4]
    first = got[0]
    assert first.body == (
        b'{"event":"messages.upsert","instance":"' + broker.instance.encode() + b'","data":{"n":0},'
        b'"date_time":"2023-12-01T10:30:00.000Z","server_url":"http://gw:8080","apikey":null,"id":"id-0"}'
    )
    assert first.routing_key == queue and first.exchange == broker.exchange
    assert first.header.properties.delivery_mode == 2
    assert first.header.properties.content_type == "application/json"
    assert [m.header.properties.message_id for m in got] == [f"id-{n}" for n in range(5)]
    queues = rabbitmqctl("list_queues", "name", "type", "durable", "--quiet", "--no-table-headers")
    assert any(line.split() == [queue, "quorum", "true"] for line in queues.splitlines()), queues
    exchanges = rabbitmqctl("list_exchanges", "name", "type", "durable", "--quiet", "--no-table-headers")
    assert any(line.split() == [broker.exchange, "topic", "true"] for line in exchanges.splitlines())


async def test_global_and_instance_queues_each_get_exactly_one_copy(broker, make_settings, tmp_path):
    broker.subscribe(tmp_path / "instances")
    other = f"{broker.instance}-other"
    settings = make_settings(
        **broker.env(RABBITMQ_GLOBAL_ENABLED="true", RABBITMQ_EVENTS_MESSAGES_UPSERT="true")
    )
    async with running(settings) as app:
        assert (await post_ingest(app, [upsert(broker.instance, 1), upsert(other, 2)]))[0] == 202
        global_queue = f"{broker.prefix}.messages.upsert"
        got = await broker.consume(global_queue, 2)
        mine = await broker.consume(f"{broker.instance}.messages.upsert", 1)
        await wait_idle(app)  # a duplicate would have been published by now
        assert await broker.depth(global_queue) == 0
        assert await broker.depth(f"{broker.instance}.messages.upsert") == 0
    assert sorted(m.routing_key for m in got) == sorted(
        [f"{broker.instance}.messages.upsert", f"{other}.messages.upsert"]
    )
    assert orjson.loads(mine[0].body)["data"] == {"n": 1}


async def test_events_published_before_any_consumer_are_kept(broker, make_settings, tmp_path):
    settings = make_settings(
        **broker.env(RABBITMQ_GLOBAL_ENABLED="true", RABBITMQ_EVENTS_CALL="true", RABBITMQ_PREFIX_KEY="")
    )
    async with running(settings) as app:
        calls = [{"event": "call", "instance": broker.instance, "data": {"n": n}} for n in range(3)]
        assert (await post_ingest(app, calls))[0] == 202
        async with asyncio.timeout(15):  # published and confirmed: nothing left in the store
            while (await app.intake.store.counts())["pending"]:  # type: ignore[union-attr]
                await asyncio.sleep(0.05)
    # The daemon is gone; the queue named as upstream names it ({event} without a prefix) has them.
    got = await broker.consume("call", 3)
    await broker.channel.queue_delete("call")  # upstream's unprefixed name: shared, so remove it
    assert sorted(orjson.loads(m.body)["data"]["n"] for m in got) == [0, 1, 2]


async def test_a_queue_declared_with_other_arguments_is_a_dead_letter_naming_it(
    broker, make_settings, tmp_path, capsys
):
    queue = f"{broker.instance}.call"
    await broker.channel.queue_declare(queue, durable=True)  # classic, not quorum
    write_instance(
        tmp_path / "instances",
        broker.instance,
        "rabbitmq: {enabled: true, events: [CALL, MESSAGES_UPSERT]}\n",
    )
    settings = make_settings(**broker.env())
    async with running(settings) as app:
        await post_ingest(app, [{"event": "call", "instance": broker.instance, "data": {}}])
        async with asyncio.timeout(15):
            while not dead_letters(database_path(settings)):
                await asyncio.sleep(0.05)
        # The channel the broker closed is replaced: other events still go out.
        await post_ingest(app, [upsert(broker.instance, 7)])
        [ok] = await broker.consume(f"{broker.instance}.messages.upsert", 1)
    [dead] = dead_letters(database_path(settings))
    assert queue in dead["last_error"] and "PRECONDITION_FAILED" in dead["last_error"]
    assert orjson.loads(ok.body)["data"] == {"n": 7}
    [line] = [line for line in capsys.readouterr().out.splitlines() if "rabbitmq.queue_refused" in line]
    assert f"queue={queue}" in line and "PRECONDITION_FAILED" in line


async def test_connections_closed_by_the_broker_mid_stream_lose_nothing(broker, make_settings, tmp_path):
    queue = broker.subscribe(tmp_path / "instances")
    settings = make_settings(**broker.env())
    async with running(settings) as app:
        ids: list[str] = []
        for batch in range(10):
            numbers = range(batch * 100, batch * 100 + 100)  # four conversations, interleaved
            events = [
                {**upsert(broker.instance, n), "data": {"n": n, "key": {"remoteJid": f"c{n % 4}"}}}
                for n in numbers
            ]
            status, body = await post_ingest(app, events)
            assert status == 202
            ids += body["ids"]
            if batch in (3, 6):
                await asyncio.to_thread(rabbitmqctl, "close_all_connections", "closed by the test")
        await broker.reconnect()
        got = await broker.consume(queue, len(ids), timeout=60)
        await wait_idle(app)
        extra = await broker.depth(queue)
    received = [m.header.properties.message_id for m in got]
    assert set(received) == set(ids), "every accepted event arrived"
    # At least once: only publishes unconfirmed when a connection dropped may come twice.
    duplicates = len(received) + extra - len(set(received))
    assert duplicates <= 2 * settings.router_queue_concurrency
    # Each conversation's events are in the queue in the order they were accepted (a repeat
    # comes right after its first copy, before anything later of its chat).
    for chat in range(4):
        numbers = [orjson.loads(m.body)["data"]["n"] for m in got]
        mine = list(dict.fromkeys(n for n in numbers if n % 4 == chat))
        assert mine == list(range(chat, 1000, 4)), f"chat c{chat}"


async def test_broker_stopped_events_wait_in_the_store_and_arrive_after(broker, make_settings, tmp_path):
    queue = broker.subscribe(tmp_path / "instances")
    settings = make_settings(**broker.env())
    async with running(settings) as app:
        assert (await post_ingest(app, [upsert(broker.instance, 0)]))[0] == 202
        [first] = await broker.consume(queue, 1)
        await asyncio.to_thread(rabbitmqctl, "stop_app")
        try:
            status, _ = await post_ingest(app, [upsert(broker.instance, n) for n in range(1, 51)])
            assert status == 202, "intake does not depend on the broker"
            async with asyncio.timeout(15):
                while (await app.intake.store.counts())["pending"] < 50:  # type: ignore[union-attr]
                    await asyncio.sleep(0.05)
        finally:
            await asyncio.to_thread(rabbitmqctl, "start_app")
            await asyncio.to_thread(rabbitmqctl, "await_startup")
        await broker.reconnect()
        got = await broker.consume(queue, 50, timeout=60)
    assert sorted({orjson.loads(m.body)["data"]["n"] for m in got}) == list(range(1, 51))
    assert orjson.loads(first.body)["data"] == {"n": 0}


def test_instance_names_that_break_topic_keys_are_rejected(tmp_path):
    write_instance(tmp_path, "shop.eu", "rabbitmq: {enabled: true}\n")  # dots are words: fine
    write_instance(tmp_path, "shop.#", "rabbitmq: {enabled: true}\n")
    write_instance(tmp_path, "web.*", "webhook: {enabled: false}\n")
    loaded = load_instances(tmp_path)
    assert set(loaded.instances) == {"shop.eu", "web.*"}
    assert "'shop.#' cannot be used with RabbitMQ: a word '*' or '#' between dots is a wildcard" in (
        "\n".join(loaded.problems)
    )


async def test_ingest_refuses_such_names_when_the_global_queue_routes_everything(broker, make_settings):
    settings = make_settings(**broker.env(RABBITMQ_GLOBAL_ENABLED="true", RABBITMQ_EVENTS_CALL="true"))
    async with running(settings) as app:
        assert (await post_ingest(app, {"event": "call", "instance": "a#b.c*", "data": {}}))[0] == 202
        status, body = await post_ingest(app, {"event": "call", "instance": "a.#", "data": {}})
    assert status == 400 and "cannot be routed by RabbitMQ" in body["error"]


async def test_webhooks_level_lines_name_the_exchange_and_routing_key(broker, daemon, tmp_path):
    broker.subscribe(tmp_path / "instances")
    proc = daemon(LOG_LEVEL="ERROR,WARN,INFO,WEBHOOKS", **broker.env())
    proc.start()
    await proc.wait_ready()
    assert (await post_ingest(proc.port, [upsert(broker.instance, 0)]))[0] == 202
    await broker.consume(f"{broker.instance}.messages.upsert", 1)
    assert await proc.terminate() == 0
    lines = [orjson.loads(line) for line in proc.logs().splitlines() if line.startswith("{")]
    attempts = [line for line in lines if line.get("msg") == "delivery.attempt"]
    assert len(attempts) == 1, attempts
    fields = ("kind", "instance", "event", "sink", "target", "exchange", "routing_key", "attempt", "outcome")
    assert {name: attempts[0].get(name) for name in fields} == {
        "kind": "WEBHOOKS",
        "instance": broker.instance,
        "event": "messages.upsert",
        "sink": "rabbitmq",
        "target": f"rabbitmq:instance:{broker.instance}",
        "exchange": broker.exchange,
        "routing_key": f"{broker.instance}.messages.upsert",
        "attempt": 1,
        "outcome": "delivered",
    }
    assert "url" not in attempts[0]
