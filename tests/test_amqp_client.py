"""The AMQP client the RabbitMQ sink publishes with, against the broker on 127.0.0.1:5672 (and
through proxies the tests control), checked by an independent consumer (aiormq)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiormq
import orjson
import pytest

from router.sinks.rabbitmq import amqp
from router.sinks.rabbitmq.channel import ChannelClosed, Nacked, Unroutable
from tests.conftest import free_port
from tests.test_rabbitmq import rabbitmqctl

URI = "amqp://guest:guest@127.0.0.1:5672/"


@dataclass
class Names:
    """An exchange and queues unique to one test, bound with ``key``; deleted afterwards."""

    exchange: str
    queue: str
    key: str
    admin: aiormq.abc.AbstractChannel

    async def consume(self, count: int, queue: str | None = None) -> list[aiormq.abc.DeliveredMessage]:
        got: asyncio.Queue[aiormq.abc.DeliveredMessage] = asyncio.Queue()
        ok = await self.admin.basic_consume(queue or self.queue, got.put, no_ack=True)
        try:
            async with asyncio.timeout(30):
                return [await got.get() for _ in range(count)]
        finally:
            await self.admin.basic_cancel(ok.consumer_tag)


@pytest.fixture
async def names() -> AsyncIterator[Names]:
    tag = uuid.uuid4().hex[:8]
    connection = await aiormq.connect(URI)
    admin = await connection.channel()
    made = Names(f"amqp-{tag}", f"amqp-{tag}.q", f"bot{tag}.messages.upsert", admin)
    await admin.exchange_declare(exchange=made.exchange, exchange_type="topic", durable=True)
    await admin.queue_declare(made.queue, durable=True, arguments={"x-queue-type": "quorum"})
    await admin.queue_bind(made.queue, made.exchange, routing_key=made.key)
    yield made
    cleanup = await connection.channel()
    for queue in (made.queue, f"{made.queue}.full", f"{made.queue}.other"):
        await cleanup.queue_delete(queue)
    await cleanup.exchange_delete(made.exchange)
    await connection.close()


@contextlib.asynccontextmanager
async def connected(uri: str = URI) -> AsyncIterator[amqp.Connection]:
    connection = await amqp.connect(uri)
    try:
        yield connection
    finally:
        async with asyncio.timeout(10):
            await connection.close()


async def test_publishes_are_confirmed_and_arrive_byte_for_byte(names):
    """Many at once, one larger than a frame (sent in several); each with its properties."""
    bodies = [orjson.dumps({"n": n, "text": "x" * 700}) for n in range(200)]
    bodies[100] = orjson.dumps({"n": 100, "text": "y" * 300_000})
    async with connected() as connection:
        channel = await connection.channel()
        assert connection.frame_max < 300_000
        confirms = [
            channel.publish(body, names.exchange, names.key, f"id-{n}") for n, body in enumerate(bodies)
        ]
        assert await asyncio.gather(*confirms) == [None] * 200
    got = await names.consume(200)
    assert [m.body for m in got] == bodies
    assert [m.header.properties.message_id for m in got] == [f"id-{n}" for n in range(200)]
    assert {(m.header.properties.content_type, m.header.properties.delivery_mode) for m in got} == {
        ("application/json", 2)
    }


async def test_only_the_publishes_no_queue_is_bound_for_fail(names):
    """A mandatory publish that comes back fails alone, even among publishes of the same id."""
    async with connected() as connection:
        channel = await connection.channel()
        confirms = []
        for n in range(30):
            key = "nobody.listens" if n % 3 == 0 else names.key
            confirms.append(channel.publish(b"{}", names.exchange, key, f"id-{n // 2}"))
        outcomes = await asyncio.gather(*confirms, return_exceptions=True)
    failed = [n for n, outcome in enumerate(outcomes) if outcome is not None]
    assert failed == list(range(0, 30, 3))
    assert all(isinstance(outcomes[n], Unroutable) and "NO_ROUTE" in str(outcomes[n]) for n in failed)
    assert len(await names.consume(20)) == 20


async def test_a_queue_that_refuses_more_nacks_what_it_refuses(names):
    full = f"{names.queue}.full"
    await names.admin.queue_declare(
        full, durable=True, arguments={"x-max-length": 2, "x-overflow": "reject-publish"}
    )
    await names.admin.queue_bind(full, names.exchange, routing_key="full.key")
    async with connected() as connection:
        channel = await connection.channel()
        outcomes = [
            await asyncio.gather(
                channel.publish(b"{}", names.exchange, "full.key", str(n)), return_exceptions=True
            )
            for n in range(4)
        ]
    assert [type(o[0]).__name__ for o in outcomes] == ["NoneType", "NoneType", "Nacked", "Nacked"]
    assert isinstance(outcomes[2][0], Nacked)


async def test_a_refused_declaration_closes_its_channel_not_the_connection(names):
    async with connected() as connection:
        channel = await connection.channel()
        with pytest.raises(ChannelClosed) as refused:
            await channel.queue_declare(names.queue)  # a classic queue: it is a quorum queue
        assert refused.value.code == 406 and "PRECONDITION_FAILED" in str(refused.value)
        assert channel.is_closed and not connection.is_closed
        with pytest.raises(ChannelClosed):
            channel.publish(b"{}", names.exchange, names.key, "on the closed channel")
        again = await connection.channel()
        await again.publish(b'{"after": 1}', names.exchange, names.key, "after")
    assert [m.body for m in await names.consume(1)] == [b'{"after": 1}']


async def test_credentials_and_vhosts_the_broker_refuses_are_named_without_the_password():
    with pytest.raises(amqp.ConnectionLost) as wrong:
        await amqp.connect("amqp://guest:s3cret-pass@127.0.0.1:5672/")
    assert "ACCESS_REFUSED" in str(wrong.value) and "s3cret-pass" not in str(wrong.value)
    with pytest.raises(amqp.ConnectionLost) as vhost:
        await amqp.connect("amqp://guest:guest@127.0.0.1:5672/no-such-vhost")
    assert "NOT_ALLOWED" in str(vhost.value)
    with pytest.raises(ValueError, match="amqp://"):
        await amqp.connect("http://127.0.0.1:5672/")


@dataclass
class Proxy:
    """127.0.0.1:port -> ``upstream``; ``freeze`` stops passing bytes both ways on the
    connections open now, without closing them (a host gone silent); ``down`` closes each new
    connection at once (a dead broker's host); ``attempts`` counts the connections tried and
    ``heartbeats`` the heartbeat frames the client sent."""

    upstream: tuple[str, int] = ("127.0.0.1", 5672)
    port: int = field(default_factory=free_port)
    frozen: asyncio.Event = field(default_factory=asyncio.Event)
    down: bool = False
    attempts: int = 0
    heartbeats: int = 0
    sent: bytearray = field(default_factory=bytearray)  # every byte the client sent
    ssl_context: ssl.SSLContext | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    pipes: list[asyncio.Task[None]] = field(default_factory=list)

    async def __aenter__(self) -> Proxy:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", self.port, ssl=self.ssl_context)
        return self

    async def __aexit__(self, *_: object) -> None:
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        for task in self.pipes:
            task.cancel()
        await asyncio.gather(*self.pipes, return_exceptions=True)
        await self.server.wait_closed()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.attempts += 1
        frozen = self.frozen
        self.writers.append(writer)
        if self.down:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self.writers.append(up_writer)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, count: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    if frozen.is_set():
                        await asyncio.Event().wait()  # never again
                    if count:
                        self.heartbeats += data.count(b"\x08\x00\x00\x00\x00\x00\x00\xce")
                        self.sent += data
                        self.forward(data, sink)
                    else:
                        sink.write(data)
                    await sink.drain()
            sink.close()

        self.pipes += [
            asyncio.create_task(pipe(reader, up_writer, True)),
            asyncio.create_task(pipe(up_reader, writer, False)),
        ]

    def forward(self, data: bytes, upstream: asyncio.StreamWriter) -> None:
        """Pass bytes the client sent on to the broker."""
        upstream.write(data)

    def freeze(self) -> None:
        self.frozen.set()
        self.frozen = asyncio.Event()  # connections opened from now on pass bytes again


async def test_heartbeats_keep_an_idle_connection_and_find_a_silent_broker(names):
    proxy = Proxy()
    async with proxy, connected(f"amqp://guest:guest@127.0.0.1:{proxy.port}/?heartbeat=1") as connection:
        channel = await connection.channel()
        async with asyncio.timeout(10):
            while proxy.heartbeats < 3:  # idle for three heartbeat intervals and more
                await asyncio.sleep(0.05)
        await channel.publish(b"{}", names.exchange, names.key, "alive")
        proxy.freeze()
        async with asyncio.timeout(10):
            reason = await connection.closed
        assert "no heartbeat from the broker" in str(reason)
        with pytest.raises(amqp.ConnectionLost):
            await channel.publish(b"{}", names.exchange, names.key, "too late")


async def test_amqps_is_verified_against_the_trusted_cas(names, tls_files, monkeypatch):
    """The system's CAs, a private one as OpenSSL reads it (SSL_CERT_FILE), or the URI's cafile."""
    ca, cert, key = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async with Proxy(ssl_context=context) as proxy:
        uri = f"amqps://guest:guest@127.0.0.1:{proxy.port}/"
        with pytest.raises(ssl.SSLCertVerificationError):
            await amqp.connect(uri)
        async with connected(f"{uri}?cafile={ca}") as connection:
            channel = await connection.channel()
            await channel.publish(b'{"tls": 1}', names.exchange, names.key, "tls")
        monkeypatch.setenv("SSL_CERT_FILE", str(ca))
        async with connected(uri) as connection:
            channel = await connection.channel()
            await channel.publish(b'{"tls": 2}', names.exchange, names.key, "tls")
    assert [m.body for m in await names.consume(2)] == [b'{"tls": 1}', b'{"tls": 2}']


async def test_a_close_by_the_broker_is_answered_before_the_socket_closes():
    """The broker closes the connection (an operator's close_connection): the client says
    CloseOk, as AMQP asks, and what waited on the connection learns why it ended."""
    proxy = Proxy()
    async with proxy:
        connection = await amqp.connect(f"amqp://guest:guest@127.0.0.1:{proxy.port}/?name=closed-by-broker")
        await asyncio.to_thread(rabbitmqctl, "close_all_connections", "closed by the test")
        async with asyncio.timeout(10):
            reason = await connection.closed
        async with asyncio.timeout(10):
            while b"\x00\x0a\x00\x33" not in proxy.sent:  # Connection.CloseOk (class 10, method 51)
                await asyncio.sleep(0.02)
    assert "closed by the test" in str(reason)
