"""RabbitMQ: a bare aiormq publisher with confirms against the daemon, both publishing to quorum
queues on the local broker; to one queue, and to a queue per instance."""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import aiormq
import orjson
from pamqp.commands import Basic
from prometheus_client.parser import text_string_to_metric_families

from bench.common import (
    CONCURRENCY,
    N_EVENTS,
    ROUNDS,
    broker_section,
    burst_rate,
    daemon,
    ingest_all,
    make_event,
    router_burst,
    timed_publishers,
)

RABBIT_URI = os.environ.get("BENCH_RABBITMQ_URI", "amqp://guest:guest@127.0.0.1:5672/")


async def rabbit_queue(tag: str) -> tuple[aiormq.abc.AbstractChannel, str, str]:
    """A fresh exchange and quorum queue bound as the router binds its global queues."""
    connection = await aiormq.connect(RABBIT_URI)
    channel = await connection.channel(publisher_confirms=True)
    exchange, queue = f"bench-{tag}", f"bench{tag}.messages.upsert"
    await channel.exchange_declare(exchange=exchange, exchange_type="topic", durable=True)
    await channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
    await channel.queue_bind(queue, exchange, routing_key="*.messages.upsert")
    return channel, exchange, queue


async def rabbit_cleanup(channel: aiormq.abc.AbstractChannel, exchange: str, queue: str) -> None:
    await channel.queue_delete(queue)
    await channel.exchange_delete(exchange)
    await channel.connection.close()


async def wait_depth(channel: aiormq.abc.AbstractChannel, queue: str, count: int) -> None:
    deadline = time.monotonic() + 300
    while (await channel.queue_declare(queue, passive=True)).message_count < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{queue} did not reach {count} messages")
        await asyncio.sleep(0.02)


async def bench_rabbit_bare(tag: str) -> dict[str, float]:
    """aiormq with publisher confirms, CONCURRENCY publishes in flight, same 1 KB envelopes."""
    channel, exchange, queue = await rabbit_queue(tag)
    try:
        next_n = iter(range(N_EVENTS))

        async def worker() -> None:
            for n in next_n:
                body = orjson.dumps({**make_event(n, time.time()), "id": str(n)})
                await channel.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key="bench.messages.upsert",
                    properties=Basic.Properties(
                        delivery_mode=2, content_type="application/json", message_id=str(n)
                    ),
                )

        elapsed, cpu = await timed_publishers(worker)
        await wait_depth(channel, queue, N_EVENTS)
    finally:
        await rabbit_cleanup(channel, exchange, queue)
    return burst_rate(elapsed, cpu)


async def bench_rabbit_router(tag: str) -> dict[str, float]:
    channel, exchange, queue = await rabbit_queue(tag)
    rabbit = {
        "RABBITMQ_ENABLED": "true",
        "RABBITMQ_URI": RABBIT_URI,
        "RABBITMQ_EXCHANGE_NAME": exchange,
        "RABBITMQ_GLOBAL_ENABLED": "true",
        "RABBITMQ_PREFIX_KEY": f"bench{tag}",
        "RABBITMQ_EVENTS_MESSAGES_UPSERT": "true",
        "ROUTER_QUEUE_CONCURRENCY": str(CONCURRENCY),
    }
    try:
        return await router_burst(rabbit, wait_depth(channel, queue, N_EVENTS))
    finally:
        await rabbit_cleanup(channel, exchange, queue)


async def rabbitmq_section() -> dict[str, object]:
    return await broker_section(
        f"rabbitmq, {N_EVENTS} events of ~1 KB, quorum queue, confirms, concurrency {CONCURRENCY}",
        ("bare aiormq publisher (confirms)", bench_rabbit_bare),
        ("router: /ingest -> SQLite -> RabbitMQ", bench_rabbit_router),
        target=0.8,
    )


INSTANCES = int(os.environ.get("BENCH_RABBITMQ_INSTANCES", "200"))  # quorum queues: keep it modest
INSTANCE_EVENTS = int(os.environ.get("BENCH_RABBITMQ_INSTANCE_EVENTS", "10000"))


def instance_names(tag: str, instances: int) -> list[str]:
    return [f"b{tag}i{n}" for n in range(instances)]


def instance_queues(tag: str, instances: int) -> list[str]:
    """The queue the router declares for each instance's messages.upsert (router topology)."""
    return [f"{name}.messages.upsert" for name in instance_names(tag, instances)]


async def declared(tag: str, instances: int) -> tuple[aiormq.abc.AbstractChannel, str, list[str]]:
    """The exchange and instance queues, declared and bound as the router declares them."""
    connection = await aiormq.connect(RABBIT_URI)
    channel = await connection.channel(publisher_confirms=True)
    exchange, queues = f"bench-{tag}", instance_queues(tag, instances)
    await channel.exchange_declare(exchange=exchange, exchange_type="topic", durable=True)
    for queue in queues:
        await channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
        await channel.queue_bind(queue, exchange, routing_key=queue)
    return channel, exchange, queues


async def depth(channel: aiormq.abc.AbstractChannel, queues: list[str]) -> int:
    return sum([(await channel.queue_declare(queue, passive=True)).message_count for queue in queues])


async def delete(channel: aiormq.abc.AbstractChannel, exchange: str, queues: list[str]) -> None:
    for queue in queues:
        await channel.queue_delete(queue)
    await channel.exchange_delete(exchange)
    await channel.connection.close()


async def bare_to_instances(tag: str, instances: int) -> dict[str, float]:
    """aiormq, confirms, CONCURRENCY in flight, each event to its instance's existing queue."""
    channel, exchange, queues = await declared(tag, instances)
    names = instance_names(tag, instances)
    try:
        next_n = iter(range(INSTANCE_EVENTS))

        async def worker() -> None:
            for n in next_n:
                body = orjson.dumps(
                    {**make_event(n, time.time()), "instance": names[n % instances], "id": str(n)}
                )
                await channel.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=queues[n % instances],
                    properties=Basic.Properties(
                        delivery_mode=2, content_type="application/json", message_id=str(n)
                    ),
                )

        elapsed, _ = await timed_publishers(worker)
        assert await depth(channel, queues) == INSTANCE_EVENTS
    finally:
        await delete(channel, exchange, queues)
    return {"events_per_s": INSTANCE_EVENTS / elapsed}


async def router_to_instances(tag: str, instances: int, existing: bool) -> dict[str, float]:
    """The daemon with ``instances`` instance files, each subscribing its own queue; the queues
    exist already (``existing``) or are new to the broker. Timed from the first POST until the
    daemon has every delivery confirmed."""
    if existing:
        channel, exchange, queues = await declared(tag, instances)
    else:
        connection = await aiormq.connect(RABBIT_URI)
        channel, exchange, queues = (
            await connection.channel(),
            f"bench-{tag}",
            instance_queues(tag, instances),
        )
    try:
        with tempfile.TemporaryDirectory() as directory:
            names = instance_names(tag, instances)
            for name in names:
                Path(directory, f"{name}.yaml").write_text(
                    "rabbitmq: {enabled: true, events: [MESSAGES_UPSERT]}\n"
                )
            env = {
                "ROUTER_INSTANCES_DIR": directory,
                "RABBITMQ_ENABLED": "true",
                "RABBITMQ_URI": RABBIT_URI,
                "RABBITMQ_EXCHANGE_NAME": exchange,
                "ROUTER_QUEUE_CONCURRENCY": str(CONCURRENCY),
            }
            async with daemon(**env) as (port, _), aiohttp.ClientSession() as session:
                started = time.perf_counter()
                await ingest_all(
                    session, port, INSTANCE_EVENTS, posters=1, instance_of=lambda n: names[n % instances]
                )
                while await delivered(session, port) < INSTANCE_EVENTS:
                    if time.perf_counter() - started > 300:
                        raise TimeoutError("the router did not deliver every event")
                    await asyncio.sleep(0.02)
                elapsed = time.perf_counter() - started
        assert await depth(channel, queues) == INSTANCE_EVENTS
    finally:
        await delete(channel, exchange, queues)
    return {"events_per_s": INSTANCE_EVENTS / elapsed}


async def delivered(session: aiohttp.ClientSession, port: int) -> float:
    """Deliveries the daemon has had confirmed, from its /metrics."""
    async with session.get(f"http://127.0.0.1:{port}/metrics") as answer:
        return sum(
            sample.value
            for family in text_string_to_metric_families(await answer.text())
            for sample in family.samples
            if sample.name == "router_deliveries_total" and sample.labels.get("outcome") == "delivered"
        )


async def rabbitmq_instances_section() -> dict[str, object]:
    """Events spread over a queue per instance, against events to one instance's queue: the
    bare client to queues that exist, the router to queues that exist and to new ones."""
    runs: dict[str, list[dict[str, float]]] = {
        "bare, 1 queue": [],
        f"bare, {INSTANCES} queues": [],
        "router, 1 queue": [],
        f"router, {INSTANCES} queues": [],
        f"router, {INSTANCES} new queues": [],
    }
    for round_no in range(ROUNDS):
        tag = f"{os.getpid()}r{round_no}"
        rows = iter(runs.values())
        next(rows).append(await bare_to_instances(tag + "b1", 1))
        next(rows).append(await bare_to_instances(tag + "bn", INSTANCES))
        next(rows).append(await router_to_instances(tag + "d1", 1, existing=True))
        next(rows).append(await router_to_instances(tag + "dn", INSTANCES, existing=True))
        next(rows).append(await router_to_instances(tag + "dw", INSTANCES, existing=False))
    rates = {name: [run["events_per_s"] for run in found] for name, found in runs.items()}
    bare_1, bare_n, router_1, router_n, router_new = rates.values()

    def paired(top: list[float], bottom: list[float]) -> float:
        return statistics.median(a / b for a, b in zip(top, bottom, strict=True))

    ratios = {
        "router / bare, 1 queue": paired(router_1, bare_1),
        f"router / bare, {INSTANCES} queues": paired(router_n, bare_n),
        f"{INSTANCES} queues / 1, bare": paired(bare_n, bare_1),
        f"{INSTANCES} queues / 1, router": paired(router_n, router_1),
        f"{INSTANCES} new / existing queues, router": paired(router_new, router_n),
    }
    print(f"\nrabbitmq per instance, {INSTANCE_EVENTS} events of ~1 KB, quorum queues, {ROUNDS} rounds")
    for name, found in rates.items():
        print(f"{name:<40} {statistics.median(found):>10.0f} events/s")
    for name, ratio in ratios.items():
        print(f"{name:<40} {ratio:>10.2f}")
    return {"instances": INSTANCES, "events": INSTANCE_EVENTS, "events_per_s": rates, "ratios": ratios}
