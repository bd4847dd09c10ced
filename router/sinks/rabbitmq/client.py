"""The RabbitMQ client: one connection kept, queues declared, one confirmed publish per attempt."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from router import logs
from router.errors import PermanentError, RetryableError, Unavailable
from router.events import Event, envelope
from router.sinks.keeper import KeptConnectionSink
from router.sinks.rabbitmq import amqp
from router.sinks.rabbitmq.channel import AmqpError, Channel, ChannelClosed, Nacked, Unroutable
from router.sinks.rabbitmq.config import RabbitmqTarget
from router.sinks.rabbitmq.declarations import REFUSED, Declarations

log = logs.get_logger("router.sinks.rabbitmq")
CONNECT_TIMEOUT_S = 10.0
CHECK_WAIT_S = 2.0  # /ready and start-up give the connection this long (within READY_TIMEOUT_S)
ANSWER_TIMEOUT_S = 30.0  # a confirm or answer later than this: the connection is taken for dead
WATCH_S = 1.0  # how often the keeper looks for confirms and answers that are that late


@dataclass(frozen=True, slots=True)
class Publish:
    """Where one event goes: the exchange, the routing key, and the (queue, binding key) pairs
    that must exist on that exchange first."""

    exchange: str
    routing_key: str
    queues: tuple[tuple[str, str], ...]


class RabbitmqSink(KeptConnectionSink):
    name = "rabbitmq"

    def __init__(self, settings: Any) -> None:
        assert settings.rabbitmq_uri is not None
        super().__init__(settings)
        self.uri = settings.rabbitmq_uri
        self.exchange = settings.rabbitmq_exchange_name
        self.prefix = settings.rabbitmq_prefix_key
        self.upstream = settings.rabbitmq_topology == "upstream"
        self._connection: amqp.Connection | None = None
        self._channel: Channel | None = None  # the publishing channel
        self._declarations: Declarations | None = None  # the connection's
        self._lock = asyncio.Lock()  # opening the publishing channel
        self._closed_because: str | None = None

    def where(self, target: RabbitmqTarget, event: Event) -> dict[str, str]:
        publish = self.plan(target, event)
        return {"exchange": publish.exchange, "routing_key": publish.routing_key}

    def plan(self, target: RabbitmqTarget, event: Event) -> Publish:
        """The exchange, routing key and queues of ``event`` for ``target``, by topology."""
        wire = event.event
        global_queue = f"{self.prefix}.{wire}" if self.prefix else wire
        instance_queue = f"{target.instance}.{wire}"
        if self.upstream:
            if target.instance is None:
                return Publish(self.exchange, wire, ((global_queue, wire),))
            return Publish(target.instance, wire, ((instance_queue, wire),))
        queues = []
        if target.instance is not None and wire in target.instance_events:
            queues.append((instance_queue, f"{target.instance}.{wire}"))
        if wire in target.global_events:
            queues.append((global_queue, f"#.{wire}"))
        return Publish(self.exchange, f"{event.instance}.{wire}", tuple(queues))

    async def aclose(self) -> None:
        await self._stop_keeper()
        await self._close_connection()

    async def check(self, targets: Sequence[RabbitmqTarget]) -> None:
        """Connected to the broker (waiting up to ``CHECK_WAIT_S`` for the connection to open)."""
        try:
            await asyncio.wait_for(self._up.wait(), CHECK_WAIT_S)
        except TimeoutError:
            raise RetryableError(f"broker unreachable: {self._last_error}") from None

    async def _keep_connected(self) -> None:
        """The one connection: opened, watched, and opened again with backoff whenever it is
        lost, for as long as it takes. Deliveries wait for it (``wait_ready``) instead of each
        trying to connect; one log line per change of state."""
        failures = 0
        while not self._closing:
            try:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for loses a cancellation that
                # arrives as the connect fails, and this loop would then never end.
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    connection = await amqp.connect(self.uri)
            except (AmqpError, ValueError, OSError, TimeoutError) as exc:
                failures += 1
                self._last_error = logs.scrub(f"{type(exc).__name__}: {exc}")
                if failures == 1:
                    log.error("rabbitmq.unreachable", error=self._last_error, hint="events wait in the store")
                delay = self.backoff.delay_s(failures)
                await asyncio.sleep(delay)
                continue
            failures = 0
            self._connection, self._channel = connection, None
            self._declarations = Declarations(connection.channel)
            self.connected = True
            self._up.set()
            log.info("rabbitmq.connected", exchange=self.exchange)
            reason = await self._watch(connection)
            self._up.clear()
            self.connected = False
            self._last_error = "the connection was lost"
            log.warning("rabbitmq.disconnected", reason=self._closed_because or logs.scrub(str(reason)))
            self._closed_because = None
            await self._close_connection()

    async def _watch(self, connection: amqp.Connection) -> amqp.ConnectionLost:
        """Until ``connection`` ends; one that leaves a publish unconfirmed or a declaration
        unanswered for longer than ``ANSWER_TIMEOUT_S`` is taken for dead and closed (what it
        had not confirmed is then published again)."""
        while True:
            with contextlib.suppress(TimeoutError):
                return await asyncio.wait_for(asyncio.shield(connection.closed), WATCH_S)
            if connection.waited_s(time.monotonic()) > ANSWER_TIMEOUT_S:
                self._lost(f"no answer from the broker in {ANSWER_TIMEOUT_S:g} s")

    def _lost(self, reason: str) -> None:
        """The connection no longer works (the broker stopped answering, the socket failed):
        drop it at once (a polite close would wait for that broker), and the keeper opens a new
        one."""
        if self._up.is_set() and self._closed_because is None:
            self._closed_because = reason
        self._up.clear()  # deliveries wait for the next connection from now on
        self.connected = False
        if self._connection is not None:
            self._connection.abort()

    async def _close_connection(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._declarations = None
        if connection is not None and not connection.is_closed:
            try:
                await asyncio.wait_for(connection.close(), CONNECT_TIMEOUT_S)
            except Exception as exc:  # closing a broken connection may fail too
                log.debug("rabbitmq.close_failed", error=str(exc))
                connection.abort()

    async def _channel_ready(self) -> Channel:
        """The publishing channel; opened again if the broker closed it (a refused publish)."""
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        async with self._lock:
            connection = self._connection
            if connection is None or connection.is_closed:
                raise Unavailable(f"broker unavailable: {self._last_error}")
            if self._channel is None or self._channel.is_closed:
                channel = await connection.channel()
                await channel.exchange_declare(self.exchange)
                self._channel = channel
                if self._declarations is not None:
                    self._declarations.add(self.exchange)
            return self._channel

    async def send(self, target: RabbitmqTarget, event: Event) -> int | None:
        body = envelope(event, server_url=event.server_url, apikey=event.apikey)
        publish = self.plan(target, event)
        if not self._up.is_set():
            raise Unavailable(f"broker unavailable: {self._last_error}")
        try:
            channel = self._channel
            if channel is None or channel.is_closed:
                channel = await self._channel_ready()
            declarations = self._declarations
            if declarations is None:
                raise Unavailable(f"broker unavailable: {self._last_error}")
            if not declarations.has(publish.exchange, publish.queues):
                await declarations.declare(publish.exchange, publish.queues)
            await channel.publish(body, publish.exchange, publish.routing_key, event.id)
        except ValueError as exc:  # a name or id AMQP cannot carry
            raise PermanentError(f"cannot publish: {exc}") from exc
        except ChannelClosed as exc:
            self._channel = None
            if exc.code in REFUSED:
                raise PermanentError(f"publish refused by the broker: {exc}") from exc
            raise RetryableError(f"the broker closed the channel: {exc}") from exc
        except Unroutable as exc:
            if self._declarations is not None:
                self._declarations.forget()  # a queue was deleted under us: declare again
            raise RetryableError(f"unroutable: no queue bound for {publish.routing_key!r}") from exc
        except Nacked as exc:
            raise RetryableError("the broker did not confirm the message (nack)") from exc
        except (AmqpError, OSError, TimeoutError) as exc:
            self._lost(f"{type(exc).__name__}: {exc}")
            raise Unavailable(f"broker unavailable: {type(exc).__name__}: {exc}") from exc
        return None
