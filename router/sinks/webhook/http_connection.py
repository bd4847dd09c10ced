"""One kept-alive HTTP/1.1 connection of the webhook client (``http``): a request written, its
answer parsed (status line, headers, then a body by Content-Length, chunked, or until close),
and the one timer that times out every request under way.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

_MAX_HEAD = 64 * 1024  # bytes of an answer's status line and headers, at most


class ProtocolError(ConnectionError):
    """The server's answer is not HTTP/1.x, or the connection ended inside it."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    headers: dict[str, str]  # names in lower case


class Deadlines:
    """When the requests under way time out: one timer, at the earliest deadline, for all of
    them. A timer per request cost more than the rest of a request's bookkeeping."""

    __slots__ = ("_busy", "_timer", "_when")

    def __init__(self) -> None:
        self._busy: dict[Connection, float] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._when = math.inf

    def add(self, connection: Connection, deadline: float) -> None:
        self._busy[connection] = deadline
        if deadline < self._when:
            self._schedule(deadline)

    def discard(self, connection: Connection) -> None:
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


class Connection(asyncio.Protocol):
    """One socket; parses one answer at a time: status line, headers, then a body by
    Content-Length, chunked, or until close."""

    def __init__(self, deadlines: Deadlines) -> None:
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
