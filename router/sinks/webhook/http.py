"""A small HTTP/1.1 client for webhooks: one POST at a time per kept-alive connection.

A webhook attempt needs little of a general client: no redirects (they are not followed), no
cookies, no proxies, no decompression; the answer's status and two of its headers are all that
is looked at. aiohttp's client spends about four times the CPU of this one per request on
loopback (measured with ``make bench``), and the webhook sink is the router's hottest path.

Connections are pooled per scheme, host and port. Idle ones are closed after ``KEEPALIVE_S``. A
request that finds its reused connection closed by the server before any answer arrived is sent
once more on a new connection (the server dropped an idle connection as the request left).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import math
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import yarl

KEEPALIVE_S = 15.0
_DEFAULT_PORTS = {"http": 80, "https": 443}
_MAX_HEAD = 64 * 1024


class InvalidURL(ValueError):
    """The URL cannot be requested (no host, not http or https)."""


class ProtocolError(ConnectionError):
    """The server's answer is not HTTP/1.x, or the connection ended inside it."""


class Origin(NamedTuple):  # a dictionary key for every request: a tuple's hash, not a dataclass's
    scheme: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]  # names in lower case


@dataclass(frozen=True, slots=True)
class _Request:
    origin: Origin
    head: bytes  # request line and the headers that do not change between attempts
    authorization: str | None


@functools.lru_cache(maxsize=1 << 16)  # a URL per instance webhook, and 10,000s of instances
def _parse(url: str) -> _Request:
    parsed = yarl.URL(url)
    scheme = parsed.scheme
    if scheme not in _DEFAULT_PORTS or not parsed.raw_host:
        raise InvalidURL(url)
    host = parsed.raw_host
    port = parsed.port or _DEFAULT_PORTS[scheme]
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == _DEFAULT_PORTS[scheme] else f"{shown}:{port}"
    target = parsed.raw_path_qs or "/"
    authorization = None
    if parsed.user is not None:
        pair = f"{parsed.user}:{parsed.password or ''}".encode()
        authorization = "Basic " + base64.b64encode(pair).decode("ascii")
    head = f"POST {target} HTTP/1.1\r\nHost: {host_header}\r\nAccept: */*\r\n"
    return _Request(Origin(scheme, host, port), head.encode("latin-1"), authorization)


Headers = tuple[tuple[str, str], ...]


@functools.lru_cache(maxsize=4096)  # most requests repeat the headers of one before
def _header_lines(headers: Headers, authorization: str | None) -> bytes:
    lines = []
    for name, value in headers:
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} holds a line break")
        lower = name.lower()
        if lower in ("content-length", "transfer-encoding", "connection"):
            continue  # the client's to set
        if lower == "authorization" and authorization is not None:
            raise ValueError("credentials in the URL and an Authorization header together")
        lines.append(f"{name}: {value}\r\n")
    if authorization is not None:
        lines.append(f"Authorization: {authorization}\r\n")
    return "".join(lines).encode()


class _Deadlines:
    """When the requests under way time out: one timer, at the earliest deadline, for all of
    them. A timer per request cost more than the rest of a request's bookkeeping."""

    __slots__ = ("_busy", "_timer", "_when")

    def __init__(self) -> None:
        self._busy: dict[_Connection, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._when = math.inf

    def add(self, connection: _Connection, deadline: float) -> None:
        self._busy[connection] = deadline
        if deadline < self._when:
            self._schedule(deadline)

    def discard(self, connection: _Connection) -> None:
        self._busy.pop(connection, None)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._when = None, math.inf

    def _schedule(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._when = when
        self._timer = asyncio.get_running_loop().call_at(when, self._expire)

    def _expire(self) -> None:
        self._timer, self._when = None, math.inf
        now = asyncio.get_running_loop().time() + 0.001  # (a timer may fire a little early)
        late = [connection for connection, deadline in self._busy.items() if deadline <= now]
        for connection in late:
            del self._busy[connection]
            connection._fail(TimeoutError())
        if self._busy:
            self._schedule(min(self._busy.values()))


class _Connection(asyncio.Protocol):
    """One socket; parses one answer at a time: status line, headers, then a body by
    Content-Length, chunked, or until close."""

    def __init__(self, deadlines: _Deadlines) -> None:
        self._deadlines = deadlines
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._buffer = bytearray()
        self._waiter: asyncio.Future[Response] | None = None
        self._response: Response | None = None
        self._remaining = -1  # body bytes still to come; -1: until close; -2: chunked
        self._keep = True

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes nobody asked for: this connection cannot be trusted
            self.close()
            return
        self._buffer += data
        try:
            self._advance()
        except ProtocolError as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._response is not None and self._remaining == -1:
            self._finish()  # an answer without a length ends with the connection
        else:
            self._fail(ProtocolError("the server closed the connection" + (f": {exc}" if exc else "")))

    # one exchange
    async def exchange(self, payload: bytes, deadline: float) -> Response:
        """Send one request and wait for its answer until ``deadline`` (loop time); TimeoutError
        after that."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Response] = loop.create_future()
        self._waiter = waiter
        self._response, self._remaining, self._keep = None, -1, True
        self._buffer.clear()
        self.transport.write(payload)
        self._deadlines.add(self, deadline)
        try:
            return await waiter
        finally:
            self._deadlines.discard(self)

    @property
    def answered(self) -> bool:
        """Some of the current answer has arrived."""
        return self._response is not None or bool(self._buffer)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, exc: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def _finish(self) -> None:
        waiter, self._waiter = self._waiter, None
        response, self._response = self._response, None
        if not self._keep:
            self.close()
        if waiter is not None and not waiter.done() and response is not None:
            waiter.set_result(response)

    def _advance(self) -> None:
        if self._response is None and not self._read_head():
            return
        buffer = self._buffer
        if self._remaining >= 0:
            taken = min(self._remaining, len(buffer))
            del buffer[:taken]
            self._remaining -= taken
            if self._remaining == 0:
                self._finish()
        elif self._remaining == -2:
            self._read_chunks()
        else:
            buffer.clear()  # until close

    def _read_head(self) -> bool:
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > _MAX_HEAD:
                raise ProtocolError("the answer's headers are too long")
            return False
        lines = bytes(self._buffer[:end]).decode("latin-1").split("\r\n")
        del self._buffer[: end + 4]
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1.") or not rest[:3].isdigit():
            raise ProtocolError(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
        status = int(rest[:3])
        if 100 <= status < 200:  # 100 Continue and friends: the real answer follows
            return self._read_head() if self._buffer else False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        self._keep = "close" not in connection and (version != "HTTP/1.0" or "keep-alive" in connection)
        self._response = Response(status, headers)
        if status in (204, 304):
            self._remaining = 0
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            self._remaining = -2
        elif "content-length" in headers:
            try:
                self._remaining = int(headers["content-length"])
            except ValueError as exc:
                raise ProtocolError("the answer's Content-Length is not a number") from exc
        else:
            self._remaining, self._keep = -1, False
        if self._remaining == 0:
            self._finish()
        return self._remaining != 0

    def _read_chunks(self) -> None:
        buffer = self._buffer
        while True:
            line_end = buffer.find(b"\r\n")
            if line_end < 0:
                return
            try:
                size = int(bytes(buffer[:line_end]).split(b";")[0], 16)
            except ValueError as exc:
                raise ProtocolError("a malformed chunk in the answer") from exc
            if size == 0:
                trailer_end = buffer.find(b"\r\n\r\n", line_end)
                if trailer_end < 0:
                    return
                del buffer[: trailer_end + 4]
                self._finish()
                return
            if len(buffer) < line_end + 2 + size + 2:
                return
            del buffer[: line_end + 2 + size + 2]


def origin_of(url: str) -> Origin:
    """Where requests to ``url`` go (scheme, host, port); raises InvalidURL."""
    return _parse(url).origin


class HttpClient:
    """POST over pooled keep-alive connections: a connection per request under way to a host,
    kept for the next (how many at once is the caller's to bound)."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context
        self._deadlines = _Deadlines()
        self._idle: dict[Origin, list[_Connection]] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    async def post(
        self,
        url: str,
        body: bytes,
        headers: Headers | Mapping[str, str],
        timeout_s: float,
    ) -> Response:
        """Send ``body``; the answer's status and headers within ``timeout_s`` (connecting
        included). Raises InvalidURL, ValueError (the request cannot be made), TimeoutError,
        OSError or ProtocolError (connection problems)."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        request = _parse(url)
        if isinstance(headers, Mapping):
            headers = tuple(headers.items())
        payload = b"".join(
            (
                request.head,
                _header_lines(headers, request.authorization),
                b"Content-Length: %d\r\n\r\n" % len(body),
                body,
            )
        )
        origin = request.origin
        connection = self._take(origin)
        if connection is not None:
            try:
                return await self._exchange(origin, connection, payload, deadline)
            except ProtocolError:
                if connection.answered:
                    raise
                # the server closed an idle connection as the request left: once more, afresh
        async with asyncio.timeout_at(deadline):
            connection = await self._connect(origin)
        return await self._exchange(origin, connection, payload, deadline)

    async def _exchange(
        self, origin: Origin, connection: _Connection, payload: bytes, deadline: float
    ) -> Response:
        try:
            response = await connection.exchange(payload, deadline)
        except BaseException:
            connection.close()
            raise
        if not connection.closed:
            connection.idle_since = time.monotonic()
            self._idle.setdefault(origin, []).append(connection)
            self._sweep_later()
        return response

    def _take(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if not connection.closed:
                return connection
        return None

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        context = None
        if origin.scheme == "https":
            context = self._ssl or _default_context()
        _, connection = await loop.create_connection(
            lambda: _Connection(self._deadlines),
            origin.host,
            origin.port,
            ssl=context,
            server_hostname=origin.host if context else None,
        )
        return connection

    def _sweep_later(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(KEEPALIVE_S, self._sweep)

    def _sweep(self) -> None:
        """Close connections idle for longer than KEEPALIVE_S."""
        self._sweeper = None
        horizon = time.monotonic() - KEEPALIVE_S
        for origin, idle in list(self._idle.items()):
            kept = [c for c in idle if not c.closed and c.idle_since > horizon]
            for connection in idle:
                if connection not in kept:
                    connection.close()
            if kept:
                self._idle[origin] = kept
            else:
                del self._idle[origin]
        if self._idle:
            self._sweep_later()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._deadlines.close()
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports finish closing


@functools.cache
def _default_context() -> ssl.SSLContext:
    return ssl.create_default_context()
