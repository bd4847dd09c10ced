"""Stock Evolution API feeding the router: its global webhook, as its own axios client posts it."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from router.errors import ConfigError
from tests.conftest import API_KEY, hook_env, post_ingest, running, wait_idle, write_instance

NODE_DIR = Path(__file__).parent / "node"


def upstream_envelope(event: str, instance: str, data: Any, router_port: int) -> dict[str, Any]:
    """What upstream's webhook controller posts: its fields, local time with a fake "Z", no id."""
    return {
        "event": event,
        "instance": instance,
        "data": data,
        "destination": f"http://127.0.0.1:{router_port}/ingest/messages-upsert",
        "date_time": "2026-11-25T07:30:00.123Z",
        "sender": "5511900000000@s.whatsapp.net",
        "server_url": "http://evolution:8080",
        "apikey": None,
    }


async def axios_post(base_url: str, envelope: dict[str, Any]) -> dict[str, Any]:
    """Upstream's global webhook call, by a real axios client in Node.js."""
    process = await asyncio.create_subprocess_exec(
        "node",
        str(NODE_DIR / "upstream_webhook.js"),
        base_url,
        orjson.dumps(envelope).decode(),
        stdout=asyncio.subprocess.PIPE,
        cwd=NODE_DIR,
    )
    out, _ = await asyncio.wait_for(process.communicate(), 30)
    answer: dict[str, Any] = orjson.loads(out)
    return answer


@pytest.mark.parametrize("by_events", [False, True])
async def test_stock_upstream_delivers_with_the_key_in_its_url(receiver, make_settings, by_events):
    """WEBHOOK_GLOBAL_URL=http://evolution:KEY@router:8080/ingest, with and without by-events."""
    async with running(make_settings(**hook_env(receiver))) as app:
        base = f"http://evolution:{API_KEY}@127.0.0.1:{app.port}/ingest"
        url = f"{base}/messages-upsert" if by_events else base  # upstream appends the suffix itself
        sent = upstream_envelope("messages.upsert", "shop.eu", {"key": {"id": "U1"}}, app.port)
        answer = await axios_post(url, sent)
        assert answer["status"] == 202, answer
        [got] = await receiver.wait_for(1, "/hook")
        await wait_idle(app)
    body = got.json()
    assert body["event"] == "messages.upsert" and body["instance"] == "shop.eu"
    assert body["data"] == {"key": {"id": "U1"}}
    assert (body["sender"], body["server_url"], body["apikey"]) == (
        "5511900000000@s.whatsapp.net",
        "http://evolution:8080",
        None,
    )
    assert body["date_time"] == "2026-11-25T07:30:00.123Z"  # as sent: its offset cannot be known
    assert body["id"] == answer["data"]["ids"][0]
    assert len(receiver.on("/hook")) == 1, "once"


async def test_url_credentials_are_the_global_key_or_the_instance_token(receiver, make_settings, tmp_path):
    write_instance(
        tmp_path / "instances",
        "bot",
        f"token: 'bot t%ken'\nwebhook: {{enabled: true, url: '{receiver.url}/bot', events: [CALL]}}\n",
    )
    async with running(make_settings()) as app:
        ingest = f"127.0.0.1:{app.port}/ingest"
        call = upstream_envelope("call", "bot", {"id": "C1"}, app.port)
        # The token's "%" is percent-encoded in the URL, as it must be; axios decodes it again.
        answer = await axios_post(f"http://any-user:bot%20t%25ken@{ingest}", call)
        assert answer["status"] == 202, answer
        answer = await axios_post(f"http://evolution:wrong@{ingest}", call)
        assert (answer["status"], answer["data"]["error"]) == (401, "invalid apikey")
        other = upstream_envelope("call", "someone-else", {}, app.port)
        answer = await axios_post(f"http://x:bot%20t%25ken@{ingest}", other)
        assert (answer["status"], answer["data"]["error"]) == (
            401,
            "apikey is not valid for instance 'someone-else'",
        )
        answer = await axios_post(f"http://{ingest}", call)
        assert answer["status"] == 401 and "http://evolution:KEY@host:port/ingest" in answer["data"]["error"]
        [got] = await receiver.wait_for(1, "/bot")
    assert got.json()["data"] == {"id": "C1"}


async def test_basic_credentials_that_are_not_text_are_refused_not_a_crash(make_settings):
    async with running(make_settings()) as app:
        for value in ("Basic !!!", "Basic " + base64.b64encode(b"user:\xff\xfe").decode(), "Bearer x"):
            status, body = await post_ingest(
                app, {"event": "call", "instance": "a"}, apikey=None, headers={"Authorization": value}
            )
            assert status == 401, (value, body)
        assert (await post_ingest(app, {"event": "call", "instance": "a"}))[0] == 202


async def test_trusted_hosts_need_no_key_and_are_off_by_default(receiver, make_settings):
    event = {"event": "messages.upsert", "instance": "bot", "data": {}}
    async with running(make_settings(**hook_env(receiver))) as app:
        assert (await post_ingest(app, event, apikey=None))[0] == 401
    settings = make_settings(**hook_env(receiver), ROUTER_INGEST_TRUSTED_HOSTS="10.0.0.0/8, 127.0.0.0/8")
    async with running(settings) as app:
        status, body = await post_ingest(app, event, apikey=None)
        assert status == 202, body
        await receiver.wait_for(1, "/hook")
    settings = make_settings(**hook_env(receiver), ROUTER_INGEST_TRUSTED_HOSTS="10.1.2.3,::1")
    async with running(settings) as app:  # 127.0.0.1 is not in it
        assert (await post_ingest(app, event, apikey=None))[0] == 401


def test_a_trusted_hosts_entry_that_is_not_an_address_is_named(make_settings):
    with pytest.raises(ConfigError) as caught:
        make_settings(ROUTER_INGEST_TRUSTED_HOSTS="10.0.0.0/8,evolution.local")
    assert "ROUTER_INGEST_TRUSTED_HOSTS (environment): Value error, 'evolution.local' is not an IP" in str(
        caught.value
    )


async def test_application_startup_reaches_only_those_who_name_it(receiver, make_settings, tmp_path):
    instances = tmp_path / "instances"
    write_instance(instances, "all", f"webhook: {{enabled: true, url: '{receiver.url}/all', events: []}}\n")
    write_instance(
        instances,
        "named",
        f"webhook: {{enabled: true, url: '{receiver.url}/named', events: [APPLICATION_STARTUP, CALL]}}\n",
    )
    settings = make_settings(WEBSOCKET_ENABLED="true", WEBSOCKET_GLOBAL_EVENTS="true")
    async with running(settings) as app, aiohttp.ClientSession() as session:
        [startup] = await receiver.wait_for(1, "/named")
        assert startup.json()["event"] == "application.startup"
        # A global stream is "all events" too; naming it in ?events= is asking for it.
        everything = await session.ws_connect(f"http://127.0.0.1:{app.port}/")
        named = await session.ws_connect(f"http://127.0.0.1:{app.port}/?events=application.startup,call")
        for event in ("application.startup", "call"):  # an adapter may send either
            assert (await post_ingest(app, {"event": event, "instance": "all", "data": {}}))[0] == 202
        assert [orjson.loads((await named.receive(timeout=5)).data)["event"] for _ in range(2)] == [
            "application.startup",
            "call",
        ]
        assert orjson.loads((await everything.receive(timeout=5)).data)["event"] == "call"
        await receiver.wait_for(1, "/all")
        await wait_idle(app)
    assert [r.json()["event"] for r in receiver.on("/all")] == ["call"]
