"""What one connection has declared, and the channels it declares on.

Declarations do not go on the publishing channel: the broker works through a channel's frames in
order, so a publish written after a declaration waits until the broker has done it, and a new
quorum queue takes it several milliseconds. With a queue per instance, every instance's first
event would hold up everyone's publishes behind it. Declarations run instead on up to
``CHANNELS`` channels of their own, several at once; the publish that needs a queue waits for
that queue's declaration only, and a declaration asked for by several attempts at once is made
once (``SingleFlight``). What is declared is remembered for the connection's life; when the
connection ends, the declarations under way fail with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from pamqp.common import FieldTable

from router import logs
from router.errors import PermanentError, RetryableError
from router.sinks.rabbitmq.channel import Channel, ChannelClosed
from router.sinks.singleflight import SingleFlight

log = logs.get_logger("router.sinks.rabbitmq")
CHANNELS = 8  # declarations under way at once on one connection
QUORUM: FieldTable = {"x-queue-type": "quorum"}

# The broker closes the channel with these when a declaration or publish cannot work as asked
# (403 access refused, 404 not found, 406 precondition failed: a queue that exists with other
# arguments): retrying will not help.
REFUSED = frozenset({403, 404, 406})

Declared = str | tuple[str, str, str]  # an exchange, or (exchange, queue, binding key)


class Declarations:
    """Exchanges and bound queues declared on ``open_channel``'s connection."""

    def __init__(self, open_channel: Callable[[], Awaitable[Channel]]) -> None:
        self._open_channel = open_channel
        self._declared: set[Declared] = set()
        self._flights: SingleFlight[None] = SingleFlight()
        self._idle: list[Channel] = []  # declaring channels open and free
        self._slots = asyncio.Semaphore(CHANNELS)

    def has(self, exchange: str, queues: tuple[tuple[str, str], ...]) -> bool:
        declared = self._declared
        return exchange in declared and all((exchange, queue, key) in declared for queue, key in queues)

    def add(self, exchange: str) -> None:
        """``exchange`` was declared elsewhere (on the publishing channel, as it opened)."""
        self._declared.add(exchange)

    def forget(self) -> None:
        """A queue may have been deleted under us: declare everything again when next needed."""
        self._declared.clear()

    async def declare(self, exchange: str, queues: tuple[tuple[str, str], ...]) -> None:
        """Declare ``exchange`` and each (queue, binding key) on it that is not declared yet.

        Raises ``PermanentError`` for what the broker refuses, ``RetryableError`` when it closed
        the channel for another reason, the connection's errors when it is lost."""
        if exchange not in self._declared:
            await self._flights.ask(exchange, lambda: self._declare_exchange(exchange))
        missing = [(queue, key) for queue, key in queues if (exchange, queue, key) not in self._declared]
        await asyncio.gather(*(self._queue(exchange, queue, key) for queue, key in missing))

    async def _queue(self, exchange: str, queue: str, key: str) -> None:
        await self._flights.ask((exchange, queue, key), lambda: self._declare_queue(exchange, queue, key))

    async def _declare_exchange(self, exchange: str) -> None:
        async with self._channel() as channel:
            try:
                await channel.exchange_declare(exchange)
            except ChannelClosed as exc:
                raise refused(exc, "exchange", exchange) from exc
        self._declared.add(exchange)

    async def _declare_queue(self, exchange: str, queue: str, key: str) -> None:
        async with self._channel() as channel:
            try:
                await channel.queue_declare(queue, arguments=QUORUM)
                await channel.queue_bind(queue, exchange, routing_key=key)
            except ChannelClosed as exc:
                raise refused(exc, "queue", queue) from exc
        self._declared.add((exchange, queue, key))

    @contextlib.asynccontextmanager
    async def _channel(self) -> AsyncIterator[Channel]:
        """A declaring channel, given back afterwards unless the broker closed it."""
        async with self._slots:
            channel = self._idle.pop() if self._idle else await self._open_channel()
            try:
                yield channel
            finally:
                if not channel.is_closed:
                    self._idle.append(channel)


def refused(exc: ChannelClosed, what: str, name: str) -> PermanentError | RetryableError:
    """The error for a declaration the broker closed the channel over."""
    if exc.code in REFUSED:
        log.error(f"rabbitmq.{what}_refused", **{what: name}, reason=str(exc))
        return PermanentError(f"{what} {name!r} refused by the broker: {exc}")
    return RetryableError(f"the broker closed the channel declaring {what} {name!r}: {exc}")
