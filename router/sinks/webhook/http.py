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
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import yarl

from router.sinks.webhook.http_connection import Connection, Deadlines, ProtocolError, Response

KEEPALIVE_S = 15.0
_DEFAULT_PORTS = {"http": 80, "https": 443}


class InvalidURL(ValueError):
    """The URL cannot be requested (no host, not http or https)."""


class Origin(NamedTuple):  # a dictionary key for every request: a tuple's hash, not a dataclass's
    scheme: str
    host: str
    port: int


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


def origin_of(url: str) -> Origin:
    """Where requests to ``url`` go (scheme, host, port); raises InvalidURL."""
    return _parse(url).origin


class HttpClient:
    """POST over pooled keep-alive connections: a connection per request under way to a host,
    kept for the next (how many at once is the caller's to bound)."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context
        self._deadlines = Deadlines()
        self._idle: dict[Origin, list[Connection]] = {}
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
        self, origin: Origin, connection: Connection, payload: bytes, deadline: float
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

    def _take(self, origin: Origin) -> Connection | None:
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if not connection.closed:
                return connection
        return None

    async def _connect(self, origin: Origin) -> Connection:
        loop = asyncio.get_running_loop()
        context = None
        if origin.scheme == "https":
            context = self._ssl or _default_context()
        _, connection = await loop.create_connection(
            lambda: Connection(self._deadlines),
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
