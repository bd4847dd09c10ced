"""A RabbitMQ outage seen through a TCP proxy the test controls: one connection is re-opened
with backoff, deliveries wait for it without attempts, errors or log lines of their own."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import orjson

from router.app import database_path
from tests.conftest import free_port, post_ingest, running
from tests.test_amqp_client import Proxy
from tests.test_rabbitmq import broker, rabbitmqctl  # noqa: F401 - the fixture


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
