"""The webhook's HTTP/1.1 client against real servers on loopback: what reached the server, how
answers of every framing are read, kept-alive connections, timeouts and TLS."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable

import orjson
import pytest

from router.sinks.webhook.http import HttpClient
from router.sinks.webhook.http_connection import ProtocolError
from tests.conftest import post_ingest

Answer = Callable[[bytes], bytes | None]  # request bytes -> raw answer (None: say nothing)


class RawServer:
    """Reads one request at a time (headers and a Content-Length body) and writes what
    ``answer`` returns; counts connections and keeps every request's bytes."""

    def __init__(self, answer: Answer, close_after: bool = False) -> None:
        self.answer = answer
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                raw = self.answer(request)
                if raw is None:
                    await asyncio.sleep(3600)
                writer.write(raw)
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0, ssl=ssl_context)
        port = self.server.sockets[0].getsockname()[1]
        return f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., asyncio.Future[tuple[RawServer, str]]]]:
    servers: list[RawServer] = []

    async def start(answer: Answer, close_after: bool = False, ssl_context: ssl.SSLContext | None = None):
        server = RawServer(answer, close_after)
        servers.append(server)
        return server, await server.start(ssl_context)

    yield start  # type: ignore[misc]
    for server in servers:
        assert server.server is not None
        server.server.close()


def ok(_: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def test_posts_the_body_and_headers_and_keeps_the_connection(serve):
    server, base = await serve(ok)
    client = HttpClient()
    try:
        for n in range(5):
            answer = await client.post(f"{base}/hook?n={n}", b'{"n": %d}' % n, {"X-Token": "t"}, 5)
            assert answer.status == 200
    finally:
        await client.close()
    assert server.connections == 1
    head, _, body = server.requests[3].partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /hook?n=3 HTTP/1.1"
    assert f"Host: {base.removeprefix('http://')}" in lines
    assert "X-Token: t" in lines and "Content-Length: 8" in lines
    assert body == b'{"n": 3}'


async def test_credentials_in_the_url_become_basic_authorization(serve):
    server, base = await serve(ok)
    client = HttpClient()
    try:
        await client.post(base.replace("http://", "http://evo:s%40cret@") + "/", b"{}", {}, 5)
        with pytest.raises(ValueError, match="credentials in the URL"):
            await client.post(
                base.replace("http://", "http://evo:x@") + "/", b"{}", {"Authorization": "Bearer x"}, 5
            )
        with pytest.raises(ValueError, match="line break"):
            await client.post(f"{base}/", b"{}", {"X-Evil": "a\r\nInjected: yes"}, 5)
    finally:
        await client.close()
    assert b"Authorization: Basic ZXZvOnNAY3JldA==\r\n" in server.requests[0]  # evo:s@cret
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    ("raw", "connections"),
    [
        (
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n3;x\r\nefg\r\n0\r\n\r\n",
            1,
        ),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nabc", 1),
        (b"HTTP/1.1 204 No Content\r\n\r\n", 1),
        (b"HTTP/1.1 201 Created\r\n\r\nuntil the connection closes", 3),
        (b"HTTP/1.0 201 Created\r\nContent-Length: 3\r\n\r\nabc", 3),
        (b"HTTP/1.1 201 Created\r\nConnection: close\r\nContent-Length: 3\r\n\r\nabc", 3),
    ],
    ids=["chunked", "continue", "no-content", "until-close", "http-1.0", "connection-close"],
)
async def test_every_framing_of_an_answer_is_read(serve, raw, connections):
    """Three requests in a row: each answer is read whole, and the connection is kept only when
    the answer allows it."""
    server, base = await serve(lambda _: raw, close_after=connections > 1)
    client = HttpClient()
    try:
        for _ in range(3):
            assert (await client.post(f"{base}/", b"{}", {}, 5)).status in (201, 204)
    finally:
        await client.close()
    assert len(server.requests) == 3 and server.connections == connections


async def test_a_connection_the_server_closed_while_idle_is_replaced(serve):
    server, base = await serve(ok, close_after=True)  # answers, then closes without saying so
    client = HttpClient()
    try:
        for _ in range(4):
            assert (await client.post(f"{base}/", b"{}", {}, 5)).status == 200
            await asyncio.sleep(0)  # the close may or may not have been seen yet
    finally:
        await client.close()
    assert len(server.requests) == 4 and server.connections == 4


async def test_no_answer_times_out_and_the_connection_is_dropped(serve):
    server, base = await serve(lambda request: None if b"/never" in request else ok(request))
    client = HttpClient()
    try:
        with pytest.raises(TimeoutError):
            await client.post(f"{base}/never", b"{}", {}, 0.2)
        assert (await client.post(f"{base}/", b"{}", {}, 5)).status == 200
    finally:
        await client.close()
    assert server.connections == 2  # the timed-out connection was not reused


async def test_a_broken_answer_is_a_protocol_error(serve):
    _, base = await serve(lambda _: b"SMTP ready\r\n\r\n")
    client = HttpClient()
    try:
        with pytest.raises(ProtocolError, match=r"not an HTTP/1\.x answer"):
            await client.post(f"{base}/", b"{}", {}, 5)
    finally:
        await client.close()


async def test_https_is_verified(serve, tls_files):
    """Over TLS to a server whose certificate the client's CAs vouch for; a server they do not
    vouch for is refused."""
    ca, cert, key = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server, base = await serve(ok, ssl_context=context)
    verified = HttpClient(ssl.create_default_context(cafile=str(ca)))
    untrusted = HttpClient(ssl.create_default_context())
    try:
        assert (await verified.post(f"{base}/hook", b'{"tls": 1}', {}, 5)).status == 200
        with pytest.raises(ssl.SSLCertVerificationError):
            await untrusted.post(f"{base}/hook", b"{}", {}, 5)
    finally:
        await verified.close()
        await untrusted.close()
    assert server.requests[0].endswith(b'{"tls": 1}')


async def test_the_daemon_delivers_to_an_https_webhook_its_ca_file_trusts(serve, tls_files, daemon):
    """A private CA is trusted the way OpenSSL reads it (SSL_CERT_FILE); the event arrives."""
    ca, cert, key = tls_files
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server, base = await serve(ok, ssl_context=context)
    proc = daemon(
        SSL_CERT_FILE=str(ca),
        WEBHOOK_GLOBAL_ENABLED="true",
        WEBHOOK_GLOBAL_URL=f"{base}/hook",
        WEBHOOK_EVENTS_CALL="true",
    )
    proc.start()
    try:
        await proc.wait_ready()
        assert (await post_ingest(proc.port, {"event": "call", "instance": "bot", "data": {"n": 1}}))[
            0
        ] == 202
        async with asyncio.timeout(10):
            while not server.requests:
                await asyncio.sleep(0.05)
    finally:
        await proc.terminate()
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /hook HTTP/1.1\r\n")
    assert orjson.loads(body)["event"] == "call" and orjson.loads(body)["data"] == {"n": 1}
