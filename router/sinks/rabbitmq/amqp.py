"""A small AMQP 0-9-1 client for publishing with confirms: one connection, channels that declare
exchanges and queues and publish.

The sink needs little of a general client: no consuming, no transactions. A publish is three
frames built with a few ``struct.pack`` calls and written with the others of the same loop turn
in one system call; the broker's confirms are read without decoding anything else. aiormq spent
more CPU per confirmed publish than the rest of the router's path for that event together
(measured with ``make bench``). The rare frames (the handshake, declarations, a closed channel)
are encoded and decoded with pamqp.

Confirms: a publish returns a future that resolves when the broker confirms it (``Basic.Ack``),
and fails with ``Nacked``, with ``Unroutable`` when the broker returned it (``mandatory``: no
queue is bound for its routing key), with ``ChannelClosed`` when the broker closed the channel,
and with ``ConnectionLost`` when the connection ends first.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from pamqp import commands, frame
from pamqp.base import Frame
from pamqp.common import FieldTable

from router import __version__
from router.sinks.rabbitmq.channel import FRAME, AmqpError, Channel, ConnectionLost, decode

__all__ = ["AmqpError", "Channel", "Connection", "ConnectionLost", "Params", "connect"]

_HEARTBEAT = b"\x08\x00\x00\x00\x00\x00\x00\xce"
DEFAULT_FRAME_MAX = 131072


@dataclass(frozen=True, slots=True)
class Params:
    host: str
    port: int
    tls: bool
    user: str
    password: str
    vhost: str
    heartbeat_s: int | None  # None: as the broker proposes
    frame_max: int
    name: str | None
    cafile: str | None  # TLS: trust this CA file as well
    certfile: str | None  # TLS: present this client certificate (with keyfile)
    keyfile: str | None

    @classmethod
    def from_uri(cls, uri: str) -> Params:
        """``amqp[s]://user:pass@host:port/vhost?heartbeat=60&frame_max=131072&name=...``
        (also ``frameMax``, and for amqps ``cafile``, ``certfile`` and ``keyfile``)."""
        parts = urlsplit(uri)
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise ValueError("expected amqp://user:pass@host:port/vhost or amqps://...")
        query = {key.lower().replace("_", ""): values[-1] for key, values in parse_qs(parts.query).items()}
        tls = parts.scheme == "amqps"
        try:
            heartbeat = int(query["heartbeat"]) if "heartbeat" in query else None
            frame_max = int(query.get("framemax", DEFAULT_FRAME_MAX))
        except ValueError:
            raise ValueError("heartbeat and frame_max in the URI must be whole numbers") from None
        return cls(
            host=parts.hostname,
            port=parts.port or (5671 if tls else 5672),
            tls=tls,
            user=unquote(parts.username or "guest"),
            password=unquote(parts.password or "guest"),
            vhost=unquote(parts.path[1:]) if len(parts.path) > 1 else "/",
            heartbeat_s=heartbeat,
            frame_max=frame_max,
            name=query.get("name") or query.get("connectionname"),
            cafile=query.get("cafile"),
            certfile=query.get("certfile"),
            keyfile=query.get("keyfile"),
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """For amqps: the system's CAs (``SSL_CERT_FILE`` for a private one) and ``cafile``."""
        if not self.tls:
            return None
        context = ssl.create_default_context()
        if self.cafile:
            context.load_verify_locations(self.cafile)
        if self.certfile:
            context.load_cert_chain(self.certfile, self.keyfile)
        return context


async def connect(uri: str) -> Connection:
    """Open a connection and finish the handshake (bound by the caller's timeout)."""
    params = Params.from_uri(uri)
    loop = asyncio.get_running_loop()
    _, connection = await loop.create_connection(
        lambda: Connection(params), params.host, params.port, ssl=params.ssl_context()
    )
    try:
        await connection.handshake()
    except BaseException:
        connection.abort()
        raise
    return connection


class Connection(asyncio.Protocol):
    """One AMQP connection; ``closed`` resolves (with the reason) when it ends."""

    def __init__(self, params: Params) -> None:
        self.params = params
        self.frame_max = params.frame_max
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._out: list[bytes] = []  # frames of this loop turn, written together
        self._channels: dict[int, Channel] = {}
        self._waiter: asyncio.Future[Frame] | None = None  # the handshake's next method on channel 0
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.closed: asyncio.Future[ConnectionLost] = loop.create_future()
        self._heartbeat_s = 0
        self._received_at = self._sent_at = time.monotonic()
        self._beat: asyncio.TimerHandle | None = None
        self.blocked = False  # the broker said Connection.Blocked, and not yet Unblocked
        self._resumed_at = float("-inf")  # when it last said Unblocked (monotonic)

    @property
    def is_closed(self) -> bool:
        return self.closed.done()

    # --- protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # a stream transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(ConnectionLost(f"the connection was lost: {exc}" if exc else "the connection was closed"))

    def data_received(self, data: bytes) -> None:
        self._received_at = time.monotonic()
        buffer = self._buffer
        buffer += data
        offset, size = 0, len(buffer)
        while size - offset >= 8:
            kind, channel, length = FRAME.unpack_from(buffer, offset)
            end = offset + 7 + length
            if end >= size:
                break
            if buffer[end] != 0xCE:
                self._fail(ConnectionLost("the broker sent a malformed frame"))
                return
            payload = bytes(buffer[offset + 7 : end])
            offset = end + 1
            if channel:
                target = self._channels.get(channel)
                if target is not None:
                    target.frame_received(kind, payload)
            elif kind == 1:
                self._connection_method(payload)
        del buffer[:offset]
        if buffer[:4] == b"AMQP":  # the broker's answer to a protocol version it does not speak
            self._fail(ConnectionLost(f"the broker does not speak AMQP 0-9-1 ({bytes(buffer[:8])!r})"))

    def _connection_method(self, payload: bytes) -> None:
        method = decode(1, payload)
        if isinstance(method, commands.Connection.Close):
            self.send(0, commands.Connection.CloseOk())
            reason = ConnectionLost(f"closed by the broker: {method.reply_code} {method.reply_text}")
            self._fail(reason)
        elif isinstance(method, commands.Connection.CloseOk):
            self._fail(ConnectionLost("the connection was closed"))
        elif isinstance(method, commands.Connection.Blocked):
            self.blocked = True  # a resource alarm: the broker takes nothing until it is over
        elif isinstance(method, commands.Connection.Unblocked):
            self.blocked, self._resumed_at = False, time.monotonic()
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(method)

    def _fail(self, reason: ConnectionLost) -> None:
        self._end(reason)
        if self._transport is not None:
            if self._out:  # what is queued (the CloseOk of a close by the broker) goes out first
                self._flush()
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        self._end(ConnectionLost("the connection was closed"))

    def _end(self, reason: ConnectionLost) -> None:
        if self.closed.done():
            return
        self.closed.set_result(reason)
        if self._beat is not None:
            self._beat.cancel()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(reason)
        for channel in list(self._channels.values()):
            channel.ended(reason)
        self._channels.clear()

    # --- writing ----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue ``data``; everything queued in one turn of the loop goes out in one write."""
        if not self._out:
            self._loop.call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(out))
            self._sent_at = time.monotonic()

    def send(self, channel: int, method: Frame) -> None:
        self.write(frame.marshal(method, channel))

    # --- handshake and channels -------------------------------------------------------------

    async def _expect(self, kind: type[Frame]) -> Any:
        self._waiter = self._loop.create_future()
        method = await self._waiter
        if not isinstance(method, kind):
            raise ConnectionLost(f"expected {kind.__name__} from the broker, got {type(method).__name__}")
        return method

    async def handshake(self) -> None:
        params = self.params
        self.write(b"AMQP\x00\x00\x09\x01")
        start = await self._expect(commands.Connection.Start)
        if b"PLAIN" not in bytes(start.mechanisms, "utf-8").split():
            raise ConnectionLost(f"the broker does not offer PLAIN authentication ({start.mechanisms})")
        properties: FieldTable = {
            "product": "evolution-router",
            "version": __version__,
            "capabilities": {
                "publisher_confirms": True,
                "basic.nack": True,
                "connection.blocked": True,
                "authentication_failure_close": True,
            },
        }
        if params.name:
            properties["connection_name"] = params.name
        response = f"\0{params.user}\0{params.password}"
        self.send(0, commands.Connection.StartOk(properties, "PLAIN", response))
        tune = await self._expect(commands.Connection.Tune)
        self.frame_max = min((x for x in (tune.frame_max, params.frame_max) if x), default=DEFAULT_FRAME_MAX)
        self._heartbeat_s = tune.heartbeat if params.heartbeat_s is None else params.heartbeat_s
        channel_max = tune.channel_max or 65535
        self.send(0, commands.Connection.TuneOk(channel_max, self.frame_max, self._heartbeat_s))
        self.send(0, commands.Connection.Open(params.vhost))
        await self._expect(commands.Connection.OpenOk)
        self._waiter = None
        if self._heartbeat_s:
            self._beat = self._loop.call_later(self._heartbeat_s / 2, self._keep_beating)

    def _keep_beating(self) -> None:
        """Send a heartbeat when nothing else went out; give up on a broker silent for two."""
        now = time.monotonic()
        if now - self._received_at > 2 * self._heartbeat_s:
            self._fail(ConnectionLost(f"no heartbeat from the broker for {2 * self._heartbeat_s} s"))
            return
        if now - self._sent_at >= self._heartbeat_s / 2:
            self.write(_HEARTBEAT)
        self._beat = self._loop.call_later(self._heartbeat_s / 2, self._keep_beating)

    async def channel(self) -> Channel:
        """A new channel in confirm mode."""
        if self.closed.done():
            raise self.closed.result()
        number = next(n for n in range(1, 65536) if n not in self._channels)
        channel = Channel(self, number)
        self._channels[number] = channel
        await channel.rpc(commands.Channel.Open(), commands.Channel.OpenOk)
        await channel.rpc(commands.Confirm.Select(), commands.Confirm.SelectOk)
        return channel

    def waited_s(self, now: float) -> float:
        """How long the broker has kept any channel waiting (for an answer or a confirm), not
        counting while it said it was blocked (a resource alarm is not a dead broker)."""
        if self.blocked:
            return 0.0
        waited = max((channel.waited_s(now) for channel in self._channels.values()), default=0.0)
        return min(waited, now - self._resumed_at)

    def forget(self, channel: Channel) -> None:
        if self._channels.get(channel.number) is channel:
            del self._channels[channel.number]

    async def close(self) -> None:
        """Close politely (the caller bounds how long the broker may take to agree)."""
        if self.closed.done():
            return
        self.send(0, commands.Connection.Close(200, "bye", 0, 0))
        try:
            await asyncio.shield(self.closed)
        finally:
            if self._transport is not None:
                self._transport.close()
