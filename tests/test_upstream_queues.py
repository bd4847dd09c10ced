"""Consumers written against Evolution API 2.3.6's queues keep working (RABBITMQ_TOPOLOGY and
SQS_NAMING set to ``upstream``), and dotted instance names route on the router's own layout."""

from __future__ import annotations

import uuid

import aiormq
import orjson

from router.events import WIRE_NAMES
from tests.conftest import post_ingest, run_router, running, wait_idle, write_instance
from tests.test_rabbitmq import URI, broker  # noqa: F401 - the fixture
from tests.test_sqs import receive_all, sqs_client, sqs_env, sqs_server  # noqa: F401 - fixtures


async def own_queue(channel: aiormq.abc.AbstractChannel, exchange: str, key: str) -> str:
    """What an upstream consumer does: declare its exchange and queue, bind it with the event."""
    await channel.exchange_declare(exchange=exchange, exchange_type="topic", durable=True)
    queue = f"{exchange}-consumer-{uuid.uuid4().hex[:6]}"
    await channel.queue_declare(queue, durable=True, exclusive=False)
    await channel.queue_bind(queue, exchange, routing_key=key)
    return queue


async def drain(channel: aiormq.abc.AbstractChannel, queue: str) -> list[dict[str, object]]:
    got = []
    while (message := await channel.basic_get(queue, no_ack=True)).body:
        got.append(orjson.loads(message.body))
    return got


async def test_rabbitmq_upstream_topology_reaches_consumers_bound_the_upstream_way(
    broker,  # noqa: F811
    make_settings,
    tmp_path,
):
    instance = f"{broker.instance}.eu"  # dotted, as upstream allows
    write_instance(tmp_path / "instances", instance, "rabbitmq: {enabled: true, events: [MESSAGES_UPSERT]}\n")
    env = broker.env(
        RABBITMQ_TOPOLOGY="upstream", RABBITMQ_GLOBAL_ENABLED="true", RABBITMQ_EVENTS_MESSAGES_UPSERT="true"
    )
    channel = broker.channel
    mine = await own_queue(channel, instance, "messages.upsert")  # the instance's exchange
    everyone = await own_queue(channel, broker.exchange, "messages.upsert")  # the global exchange
    try:
        async with running(make_settings(**env)) as app:
            event = {"event": "messages.upsert", "instance": instance, "data": {"n": 1}}
            assert (await post_ingest(app, event))[0] == 202
            # upstream's own queues, declared by the router as upstream declares them
            [in_instance_queue] = await broker.consume(f"{instance}.messages.upsert", 1)
            [in_global_queue] = await broker.consume(f"{broker.prefix}.messages.upsert", 1)
            await wait_idle(app)
        got_mine, got_everyone = await drain(channel, mine), await drain(channel, everyone)
    finally:
        for queue in (mine, everyone):
            await channel.queue_delete(queue)
    for body in (got_mine, got_everyone):
        assert [(b["event"], b["instance"], b["data"]) for b in body] == [
            ("messages.upsert", instance, {"n": 1})
        ], "each consumer once"
    assert in_instance_queue.routing_key == in_global_queue.routing_key == "messages.upsert"
    assert (in_instance_queue.exchange, in_global_queue.exchange) == (instance, broker.exchange)


async def test_an_instance_exchange_of_another_type_is_a_dead_letter_naming_it(
    broker,  # noqa: F811
    make_settings,
    tmp_path,
    capsys,
):
    """Upstream's topology publishes to an exchange named after the instance; one that exists as
    another type is refused by the broker: the delivery ends as a dead letter naming it, once."""
    from router.deadletters import dead_letters  # noqa: PLC0415

    instance = broker.instance
    write_instance(tmp_path / "instances", instance, "rabbitmq: {enabled: true, events: [CALL]}\n")
    await broker.channel.exchange_declare(exchange=instance, exchange_type="fanout", durable=True)
    settings = make_settings(**broker.env(RABBITMQ_TOPOLOGY="upstream"))
    async with running(settings) as app:
        assert (await post_ingest(app, {"event": "call", "instance": instance, "data": {}}))[0] == 202
        await wait_idle(app)
    [dead] = dead_letters(settings.database_path)
    assert f"exchange '{instance}' refused by the broker" in dead["last_error"]
    assert "PRECONDITION_FAILED" in dead["last_error"]
    [line] = [line for line in capsys.readouterr().out.splitlines() if "rabbitmq.exchange_refused" in line]
    assert f"exchange={instance}" in line


async def test_router_topology_routes_dotted_instances_to_the_global_queue(broker, make_settings):  # noqa: F811
    env = broker.env(RABBITMQ_GLOBAL_ENABLED="true", RABBITMQ_EVENTS_CALL="true")
    async with running(make_settings(**env)) as app:
        for instance in ("plain", "a.b", "x.call"):
            assert (await post_ingest(app, {"event": "call", "instance": instance, "data": {}}))[0] == 202
        got = await broker.consume(f"{broker.prefix}.call", 3)
        await wait_idle(app)
    assert sorted(orjson.loads(m.body)["instance"] for m in got) == ["a.b", "plain", "x.call"]
    assert sorted(m.routing_key for m in got) == ["a.b.call", "plain.call", "x.call.call"]


def test_no_event_name_ends_with_the_words_of_another():
    """Why `#.<event>` binds exactly one event: no wire name is a dotted suffix of another."""
    for wire in WIRE_NAMES:
        for other in WIRE_NAMES:
            assert other == wire or not other.endswith("." + wire), (other, wire)


async def test_sqs_upstream_naming_fills_the_queues_upstream_consumers_poll(
    sqs_server,  # noqa: F811
    sqs_client,  # noqa: F811
    make_settings,
    tmp_path,
):
    instance = f"shop{uuid.uuid4().hex[:6]}"
    write_instance(tmp_path / "instances", instance, "sqs: {enabled: true, events: [SEND_MESSAGE_UPDATE]}\n")
    env = sqs_env(
        sqs_server,
        SQS_NAMING="upstream",
        SQS_GLOBAL_ENABLED="true",
        SQS_GLOBAL_PREFIX_NAME="evo",
        SQS_GLOBAL_MESSAGES_UPSERT="true",
        SERVER_NAME="srv",
    )
    async with running(make_settings(**env)) as app:
        events = [
            {"event": "send.message.update", "instance": instance, "data": {"n": 1}},
            {"event": "messages.upsert", "instance": instance, "data": {"n": 2}},
        ]
        assert (await post_ingest(app, events))[0] == 202
        [own] = await receive_all(sqs_client, f"{instance}_send_message_update.fifo", 1)
        [everyone] = await receive_all(sqs_client, "evo_messages_upsert.fifo", 1)
        await wait_idle(app)
    assert own["Attributes"]["MessageGroupId"] == "evolution"
    assert everyone["Attributes"]["MessageGroupId"] == f"srv-messages_upsert-{instance}"
    body = orjson.loads(own["Body"])
    assert (body["event"], body["dataType"], body["server"]) == ("send.message.update", "json", "srv")


def test_check_says_which_layout_is_in_force(base_env):
    env = {
        **base_env,
        "PATH": "/usr/bin:/bin",
        "RABBITMQ_ENABLED": "true",
        "RABBITMQ_URI": URI,
        "RABBITMQ_TOPOLOGY": "upstream",
    }
    done = run_router(env, "check")
    assert "rabbitmq topology: upstream (Evolution API 2.3.6's: an exchange per instance" in done.stdout
    done = run_router({**env, "RABBITMQ_TOPOLOGY": "router"}, "check")
    assert "rabbitmq topology: router (one exchange 'evolution_exchange', routing key" in done.stdout
    done = run_router({**env, "RABBITMQ_TOPOLOGY": "sideways"}, "check")
    assert done.returncode == 1 and "RABBITMQ_TOPOLOGY (environment)" in done.stderr
