"""An AMQP channel in confirm mode (``router.sinks.rabbitmq.amqp`` opens it): declarations, and
publishes whose futures the broker's confirms settle.

Confirms carry the publish's delivery tag (1, 2, ... on the channel), one at a time or every tag
up to one (``multiple``). A mandatory publish no queue is bound for comes back as a
``Basic.Return`` (with the message's headers and body) before its confirm: the return is matched
to the oldest unconfirmed publish with the same exchange, routing key and message id (routing
depends on nothing else, so any of several such publishes would have been returned alike), and
that publish's confirm then fails it with ``Unroutable``.
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any, Protocol

from pamqp import commands, frame
from pamqp.base import Frame
from pamqp.common import Arguments

FRAME = struct.Struct(">BHI")
END = b"\xce"
_CONTENT = struct.Struct(">HHQ")
_METHOD_ID = struct.Struct(">HH")
_ACK = struct.Struct(">QB")
_PUBLISH = b"\x00\x3c\x00\x28\x00\x00"  # Basic.Publish, ticket 0
# Basic properties: content-type application/json, delivery-mode 2 (persistent), message-id
# (property flags 15, 12 and 7).
_PROPERTIES = b"\x90\x80\x10application/json\x02"
_MANDATORY = (b"\x00", b"\x01")


class AmqpError(Exception):
    """Something the broker or the connection did; see the subclasses."""


class ConnectionLost(AmqpError, ConnectionError):
    """The connection ended (closed by the broker, the network or us) or could not be opened."""


class ChannelClosed(AmqpError):
    """The broker closed the channel: ``code`` is its reply code (403, 404, 406 ...)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(f"{code} {text}")
        self.code, self.text = code, text


class Unroutable(AmqpError):
    """A mandatory publish was returned: no queue is bound for its routing key."""


class Nacked(AmqpError):
    """The broker did not take the message (``Basic.Nack``)."""


def decode(kind: int, payload: bytes) -> Any:
    """One frame's payload decoded by pamqp (the rare frames only)."""
    return frame.unmarshal(FRAME.pack(kind, 0, len(payload)) + payload + END)[2]


def short(text: str, what: str) -> bytes:
    """An AMQP short string: a length byte, then at most 255 bytes of UTF-8."""
    encoded = text.encode()
    if len(encoded) > 255:
        raise ValueError(f"{what} is longer than AMQP's 255 bytes")
    return bytes((len(encoded),)) + encoded


class Link(Protocol):
    """What a channel needs of its connection (``amqp.Connection``)."""

    frame_max: int

    def write(self, data: bytes) -> None:
        """Send ``data`` (whole frames)."""

    def forget(self, channel: Channel) -> None:
        """``channel`` ended: its number may be used again."""


class Channel:
    """One channel of ``connection``; ``publish`` needs no round trip, the rest are RPCs."""

    def __init__(self, connection: Link, number: int) -> None:
        self.connection = connection
        self.number = number
        self._loop = asyncio.get_running_loop()
        self._rpc_lock = asyncio.Lock()
        self._waiter: asyncio.Future[Any] | None = None
        self._asked_at = 0.0  # when the RPC under way was sent
        # delivery tag -> (future, exchange, routing key, message id, when sent), oldest first
        self._unconfirmed: dict[int, tuple[asyncio.Future[None], str, str, str, float]] = {}
        self._returned: dict[int, str] = {}  # tag -> the broker's reason, settled by its confirm
        self._tag = 0  # the last tag given
        self._low = 1  # no tag below this is unconfirmed
        self._return: list[Any] | None = None  # a returned message being read: [method, id, left]
        self.closed: AmqpError | None = None

    @property
    def is_closed(self) -> bool:
        return self.closed is not None

    # --- requests ---------------------------------------------------------------------------

    async def rpc(self, method: Frame, reply: type[Frame]) -> Any:
        async with self._rpc_lock:
            if self.closed is not None:
                raise self.closed
            self._waiter = waiter = self._loop.create_future()
            self._asked_at = time.monotonic()
            self.connection.write(frame.marshal(method, self.number))
            try:
                answer = await waiter
            finally:
                self._waiter = None
            if not isinstance(answer, reply):
                raise AmqpError(f"expected {reply.__name__} from the broker, got {type(answer).__name__}")
            return answer

    async def exchange_declare(self, exchange: str, exchange_type: str = "topic") -> None:
        method = commands.Exchange.Declare(exchange=exchange, exchange_type=exchange_type, durable=True)
        await self.rpc(method, commands.Exchange.DeclareOk)

    async def queue_declare(self, queue: str, arguments: Arguments = None) -> None:
        method = commands.Queue.Declare(queue=queue, durable=True, arguments=arguments)
        await self.rpc(method, commands.Queue.DeclareOk)

    async def queue_bind(self, queue: str, exchange: str, routing_key: str) -> None:
        method = commands.Queue.Bind(queue=queue, exchange=exchange, routing_key=routing_key)
        await self.rpc(method, commands.Queue.BindOk)

    def publish(
        self, body: bytes, exchange: str, routing_key: str, message_id: str, mandatory: bool = True
    ) -> asyncio.Future[None]:
        """Send a persistent JSON message; the future settles with the broker's confirm."""
        if self.closed is not None:
            raise self.closed
        method = (
            _PUBLISH
            + short(exchange, "the exchange name")
            + short(routing_key, "the routing key")
            + _MANDATORY[mandatory]
        )
        head = _CONTENT.pack(60, 0, len(body)) + _PROPERTIES + short(message_id, "the message id")
        number, limit = self.number, self.connection.frame_max - 8
        parts = [FRAME.pack(1, number, len(method)), method, END, FRAME.pack(2, number, len(head)), head, END]
        if len(body) <= limit:
            parts += (FRAME.pack(3, number, len(body)), body, END)
        else:
            for start in range(0, len(body), limit):
                chunk = body[start : start + limit]
                parts += (FRAME.pack(3, number, len(chunk)), chunk, END)
        self.connection.write(b"".join(parts))
        self._tag += 1
        future: asyncio.Future[None] = self._loop.create_future()
        self._unconfirmed[self._tag] = (future, exchange, routing_key, message_id, time.monotonic())
        return future

    def waited_s(self, now: float) -> float:
        """How long the broker has kept this channel waiting: for the answer to the RPC under
        way, or the oldest unconfirmed publish's confirm (0: nothing waits)."""
        waited = now - self._asked_at if self._waiter is not None else 0.0
        for entry in self._unconfirmed.values():
            return max(waited, now - entry[4])
        return waited

    # --- what the broker sends --------------------------------------------------------------

    def frame_received(self, kind: int, payload: bytes) -> None:
        if kind == 1:
            method_id = _METHOD_ID.unpack_from(payload)
            if method_id == (60, 80):  # Basic.Ack
                tag, bits = _ACK.unpack_from(payload, 4)
                self._confirm(tag, bits & 1, None)
            elif method_id == (60, 120):  # Basic.Nack
                tag, bits = _ACK.unpack_from(payload, 4)
                self._confirm(tag, bits & 1, Nacked("the broker did not take the message (nack)"))
            elif method_id == (60, 50):  # Basic.Return: its header and body follow
                self._return = [decode(1, payload), "", 0]
            elif method_id == (20, 40):  # Channel.Close
                method = decode(1, payload)
                self.connection.write(frame.marshal(commands.Channel.CloseOk(), self.number))
                self.ended(ChannelClosed(method.reply_code, method.reply_text))
            elif self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(decode(1, payload))
        elif self._return is not None:
            if kind == 2:
                content = decode(2, payload)
                self._return[1:] = [content.properties.message_id or "", content.body_size]
            else:
                self._return[2] -= len(payload)
            if self._return[2] <= 0:
                self._returned_message(*self._return[:2])

    def _returned_message(self, method: Any, message_id: str) -> None:
        self._return = None
        where = (method.exchange, method.routing_key, message_id)
        for tag, (_, exchange, routing_key, mid, _) in self._unconfirmed.items():
            if (exchange, routing_key, mid) == where and tag not in self._returned:
                self._returned[tag] = f"{method.reply_code} {method.reply_text}"
                return

    def _confirm(self, tag: int, multiple: int, error: AmqpError | None) -> None:
        if multiple:
            for each in range(self._low, tag + 1):
                self._settle(each, error)
            self._low = max(self._low, tag + 1)
        else:
            self._settle(tag, error)
            while self._low <= self._tag and self._low not in self._unconfirmed:
                self._low += 1

    def _settle(self, tag: int, error: AmqpError | None) -> None:
        entry = self._unconfirmed.pop(tag, None)
        returned = self._returned.pop(tag, None) if self._returned else None
        if entry is None or entry[0].done():  # its publisher gave up waiting
            return
        if error is None and returned is not None:
            error = Unroutable(f"returned by the broker: {returned}")
        if error is None:
            entry[0].set_result(None)
        else:
            entry[0].set_exception(error)

    def ended(self, reason: AmqpError) -> None:
        """The channel or its connection ended: everything waiting on it fails with ``reason``."""
        if self.closed is not None:
            return
        self.closed = reason
        self.connection.forget(self)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(reason)
        for future, *_ in self._unconfirmed.values():
            if not future.done():
                future.set_exception(reason)
        self._unconfirmed.clear()
        self._returned.clear()
