"""The WebSocket streams, with real clients: aiohttp's client and a raw socket that never reads."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.conftest import API_KEY, post_ingest, running, write_instance


def ws_env(**extra: str) -> dict[str, str]:
    return {"WEBSOCKET_ENABLED": "true", **extra}


def upsert(instance: str, n: int, **data: object) -> dict[str, object]:
    return {"event": "messages.upsert", "instance": instance, "data": {"n": n, **data}}


async def next_text(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10) -> str:
    message = await ws.receive(timeout=timeout)
    assert message.type == aiohttp.WSMsgType.TEXT, message
    return str(message.data)


async def refusal(session: aiohttp.ClientSession, url: str) -> tuple[int | None, str]:
    """Connect and read until the server closes: (close code, reason)."""
    async with session.ws_connect(url) as ws:
        message = await ws.receive(timeout=10)
        assert message.type == aiohttp.WSMsgType.CLOSE, message
        return ws.close_code, str(message.extra or "")


async def test_instance_stream_gets_its_subscribed_events_as_envelopes(make_settings, tmp_path):
    write_instance(tmp_path / "instances", "bot", "websocket: {enabled: true, events: [MESSAGES_UPSERT]}\n")
    async with (
        running(make_settings(**ws_env())) as app,
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://127.0.0.1:{app.port}/bot") as ws,
    ):
        event = {**upsert("bot", 1), "id": "id-1", "date_time": "2023-12-01T10:30:00.000Z"}
        others = [upsert("other", 2), {"event": "call", "instance": "bot", "data": {}}]
        assert (await post_ingest(app, [*others, event]))[0] == 202
        text = await next_text(ws)
        assert text == (
            '{"event":"messages.upsert","instance":"bot","data":{"n":1},'
            '"date_time":"2023-12-01T10:30:00.000Z","apikey":null,"id":"id-1"}'
        )
        with pytest.raises(asyncio.TimeoutError):
            await ws.receive(timeout=0.3)  # neither the other instance's event nor an unsubscribed one


async def test_global_stream_and_narrowing_by_events(make_settings, tmp_path):
    async with (
        running(make_settings(**ws_env(WEBSOCKET_GLOBAL_EVENTS="true"))) as app,
        aiohttp.ClientSession() as session,
        session.ws_connect(f"http://127.0.0.1:{app.port}/") as everything,
        session.ws_connect(f"http://127.0.0.1:{app.port}/?events=call") as calls,
    ):
        await post_ingest(app, [upsert("a", 1), {"event": "call", "instance": "b", "data": {}}])
        got = [orjson.loads(await next_text(everything)) for _ in range(2)]
        assert [(e["instance"], e["event"]) for e in got] == [("a", "messages.upsert"), ("b", "call")]
        assert orjson.loads(await next_text(calls))["event"] == "call"
        code, reason = await refusal(session, f"http://127.0.0.1:{app.port}/?events=nope")
        assert code == 1008 and reason == "unknown event 'nope' in ?events="


async def test_global_stream_needs_global_events(make_settings):
    async with running(make_settings(**ws_env())) as app, aiohttp.ClientSession() as session:
        code, reason = await refusal(session, f"http://127.0.0.1:{app.port}/")
    assert code == 1008 and "WEBSOCKET_GLOBAL_EVENTS=false" in reason


async def test_api_key_or_instance_token_unless_the_host_is_allowed(make_settings, tmp_path):
    for name in ("bot", "shop"):
        write_instance(tmp_path / "instances", name, f"token: {name}-token\nwebsocket: {{enabled: true}}\n")
    settings = make_settings(**ws_env(WEBSOCKET_ALLOWED_HOSTS=""))
    async with running(settings) as app, aiohttp.ClientSession() as session:
        base = f"http://127.0.0.1:{app.port}"
        assert await refusal(session, f"{base}/bot") == (1008, "missing apikey (query parameter or header)")
        assert await refusal(session, f"{base}/bot?apikey=shop-token") == (
            1008,
            "invalid apikey for instance 'bot'",
        )
        # A key outside ASCII is refused like any wrong key (the comparison takes bytes).
        assert await refusal(session, f"{base}/bot?apikey=%C3%BC") == (
            1008,
            "invalid apikey for instance 'bot'",
        )
        async with (
            session.ws_connect(f"{base}/bot?apikey=bot-token") as by_token,
            session.ws_connect(f"{base}/shop", headers={"apikey": API_KEY}) as by_key,
        ):
            await post_ingest(app, [upsert("bot", 1), upsert("shop", 2)])
            assert orjson.loads(await next_text(by_token))["instance"] == "bot"
            assert orjson.loads(await next_text(by_key))["instance"] == "shop"


def raw_client_that_never_reads(port: int, path: str) -> socket.socket:
    """A real WebSocket handshake on a socket with a tiny receive buffer, then never a read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(1)  # only the handshake answer
    assert answer.startswith(b"HTTP/1.1 101"), answer
    return sock


async def test_a_client_that_cannot_keep_up_is_dropped_and_others_get_everything(make_settings, tmp_path):
    write_instance(tmp_path / "instances", "bot", "websocket: {enabled: true}\n")
    settings = make_settings(**ws_env(ROUTER_WEBSOCKET_BUFFER="20"))
    async with running(settings) as app, aiohttp.ClientSession() as session:
        slow = await asyncio.to_thread(raw_client_that_never_reads, app.port, "/bot")
        async with session.ws_connect(f"http://127.0.0.1:{app.port}/bot", max_msg_size=0) as fast:
            async with asyncio.timeout(10):
                while len(app.websocket.clients) < 2:  # type: ignore[union-attr]
                    await asyncio.sleep(0.01)
            received = 0
            for batch in range(20):
                events = [upsert("bot", batch * 10 + n, text="x" * 50_000) for n in range(10)]
                assert (await post_ingest(app, events))[0] == 202
                for _ in range(10):
                    assert orjson.loads(await next_text(fast))["data"]["n"] == received
                    received += 1
            hub = app.websocket
            assert hub is not None and hub.slow_disconnects == 1
            assert len(hub.clients) == 1
        slow.close()


class NodeClient:
    """A Node.js client from tests/node as a subprocess; its stdout lines, one at a time."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, script: str, *args: str) -> NodeClient:
        process = await asyncio.create_subprocess_exec(
            "node", str(NODE_DIR / script), *args, stdout=asyncio.subprocess.PIPE, cwd=NODE_DIR
        )
        return cls(process)

    async def line(self, timeout: float = 15) -> str:
        assert self.process.stdout is not None
        raw = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        assert raw, "the client exited"
        return raw.decode().rstrip("\n")

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()


NODE_DIR = Path(__file__).parent / "node"


async def test_node_ws_client_as_in_upstreams_example(make_settings, tmp_path):
    write_instance(tmp_path / "instances", "bot", "websocket: {enabled: true, events: []}\n")
    async with running(make_settings(**ws_env())) as app:
        client = await NodeClient.start("ws_client.js", f"ws://127.0.0.1:{app.port}/bot")
        try:
            assert await client.line() == "open"
            await post_ingest(app, [upsert("bot", n) for n in range(3)])
            got = [orjson.loads(await client.line()) for _ in range(3)]
        finally:
            await client.stop()
    assert [(e["event"], e["instance"], e["data"]["n"]) for e in got] == [
        ("messages.upsert", "bot", n) for n in range(3)
    ]


@pytest.mark.parametrize("transport", ["", "websocket"])
async def test_socketio_client_on_an_instance_namespace(make_settings, tmp_path, transport):
    write_instance(
        tmp_path / "instances",
        "bot",
        "token: bot-token\nwebsocket: {enabled: true, events: [MESSAGES_UPSERT, CONNECTION_UPDATE]}\n",
    )
    settings = make_settings(**ws_env(WEBSOCKET_ALLOWED_HOSTS=""))
    async with running(settings) as app:
        base = f"http://127.0.0.1:{app.port}"
        client = await NodeClient.start("sio_client.js", f"{base}/bot", "bot-token", transport)
        refused = await NodeClient.start("sio_client.js", f"{base}/bot", "wrong", transport)
        try:
            assert await client.line() == "connected"  # before the instance's first event
            assert await refused.line() == "refused invalid apikey for instance 'bot'"
            event = {**upsert("bot", 1), "id": "id-1", "date_time": "2023-12-01T10:30:00.000Z"}
            await post_ingest(app, [event, {"event": "call", "instance": "bot", "data": {}}])
            await post_ingest(
                app, [{"event": "connection.update", "instance": "bot", "data": {"state": "open"}}]
            )
            first, second = orjson.loads(await client.line()), orjson.loads(await client.line())
        finally:
            await client.stop()
            await refused.stop()
    assert first == {
        "name": "messages.upsert",
        "data": {
            "event": "messages.upsert",
            "instance": "bot",
            "data": {"n": 1},
            "date_time": "2023-12-01T10:30:00.000Z",
            "apikey": None,
            "id": "id-1",
        },
    }
    assert second["name"] == "connection.update" and second["data"]["data"] == {"state": "open"}


async def test_socketio_global_namespace_with_the_global_key(make_settings):
    settings = make_settings(**ws_env(WEBSOCKET_GLOBAL_EVENTS="true", WEBSOCKET_ALLOWED_HOSTS=""))
    async with running(settings) as app:
        client = await NodeClient.start("sio_client.js", f"http://127.0.0.1:{app.port}/", API_KEY)
        try:
            assert await client.line() == "connected"
            await post_ingest(app, [upsert("a", 1), upsert("b", 2)])
            got = [orjson.loads(await client.line()) for _ in range(2)]
        finally:
            await client.stop()
    assert [(g["name"], g["data"]["instance"]) for g in got] == [
        ("messages.upsert", "a"),
        ("messages.upsert", "b"),
    ]


async def test_browser_origins_outside_cors_origin_are_refused(make_settings, tmp_path):
    write_instance(tmp_path / "instances", "bot", "websocket: {enabled: true}\n")
    settings = make_settings(**ws_env(CORS_ORIGIN="https://app.example.com"))
    async with running(settings) as app, aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{app.port}/bot"
        async with session.ws_connect(url, headers={"Origin": "https://app.example.com"}) as ws:
            await post_ingest(app, [upsert("bot", 1)])
            assert orjson.loads(await next_text(ws))["data"] == {"n": 1}
        async with session.ws_connect(url, headers={"Origin": "https://evil.example"}) as ws:
            message = await ws.receive(timeout=10)
    assert message.type == aiohttp.WSMsgType.CLOSE
    assert message.data == 1008 and message.extra == "origin 'https://evil.example' is not in CORS_ORIGIN"


async def test_node_ws_client_on_the_global_stream_exactly_as_the_seed_connects(make_settings):
    async with running(make_settings(**ws_env(WEBSOCKET_GLOBAL_EVENTS="true"))) as app:
        client = await NodeClient.start("ws_client.js", f"ws://127.0.0.1:{app.port}")  # no path at all
        try:
            assert await client.line() == "open"
            await post_ingest(app, [upsert("a", 1), {"event": "qrcode.updated", "instance": "b", "data": {}}])
            got = [orjson.loads(await client.line()) for _ in range(2)]
        finally:
            await client.stop()
    assert [(e["instance"], e["event"]) for e in got] == [("a", "messages.upsert"), ("b", "qrcode.updated")]


async def test_the_buffer_of_a_client_that_does_not_read_is_bounded_in_bytes(make_settings, tmp_path, capsys):
    write_instance(tmp_path / "instances", "bot", "websocket: {enabled: true}\n")
    settings = make_settings(**ws_env(ROUTER_WEBSOCKET_BUFFER_BYTES="2000000"))  # 1,000 messages allowed
    async with running(settings) as app:
        slow = await asyncio.to_thread(raw_client_that_never_reads, app.port, "/bot")
        async with asyncio.timeout(10):
            while not app.websocket.clients:  # type: ignore[union-attr]
                await asyncio.sleep(0.01)
        for n in range(12):  # 12 MB: far more than the socket's buffers and the client's allowance
            assert (await post_ingest(app, [upsert("bot", n, text="x" * 1_000_000)]))[0] == 202
        hub = app.websocket
        assert hub is not None and hub.slow_disconnects == 1 and not hub.clients
        slow.close()
    assert "too slow: more than 2000000 bytes waiting" in capsys.readouterr().out


def masked_text_frame(text: str) -> bytes:
    payload = text.encode()
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def test_a_slow_socketio_client_is_dropped_and_counted_once(make_settings, tmp_path):
    write_instance(tmp_path / "instances", "bot", "websocket: {enabled: true}\n")
    settings = make_settings(**ws_env(ROUTER_WEBSOCKET_BUFFER="5"))
    async with running(settings) as app:
        path = "/socket.io/?EIO=4&transport=websocket"
        slow = await asyncio.to_thread(raw_client_that_never_reads, app.port, path)
        slow.sendall(masked_text_frame("40/bot,"))  # join the instance's namespace, then never read
        hub = app.websocket
        assert hub is not None
        async with asyncio.timeout(10):
            while not hub.sio_clients:
                await asyncio.sleep(0.01)
        for n in range(40):
            assert (await post_ingest(app, [upsert("bot", n, text="x" * 200_000)]))[0] == 202
        async with asyncio.timeout(10):
            while hub.slow_disconnects == 0:
                await asyncio.sleep(0.01)
        posts = [post_ingest(app, [upsert("bot", n)]) for n in range(40, 80)]
        assert {status for status, _ in await asyncio.gather(*posts)} == {202}  # emits overlap
        assert hub.slow_disconnects == 1
        slow.close()
