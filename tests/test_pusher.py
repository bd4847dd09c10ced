"""The Pusher sink against a loopback Pusher-protocol server that verifies every signature."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from router.app import database_path
from router.deadletters import dead_letters
from router.instances import load_instances
from tests.conftest import post_ingest, running, write_instance
from tests.pusher_server import PusherServer


@pytest.fixture
async def pusher() -> AsyncIterator[PusherServer]:
    server = PusherServer()
    await server.start()
    yield server
    await server.stop()


def pusher_env(server: PusherServer, **extra: str) -> dict[str, str]:
    return {
        "PUSHER_ENABLED": "true",
        "PUSHER_HOST": "127.0.0.1",
        "PUSHER_PORT": str(server.port),
        "ROUTER_QUEUE_RETRY_INITIAL_DELAY_S": "0.1",
        "ROUTER_QUEUE_RETRY_MAX_DELAY_S": "0.5",
        **extra,
    }


def instance_file(tmp_path, name: str, app_id: str, secret: str, events: str = "[MESSAGES_UPSERT]") -> None:
    write_instance(
        tmp_path / "instances",
        name,
        f"pusher: {{enabled: true, appId: {app_id}, key: key-{app_id}, secret: {secret},"
        f" cluster: us2, useTLS: false, events: {events}}}\n",
    )


def upsert(instance: str, n: int, **data: object) -> dict[str, object]:
    return {"event": "messages.upsert", "instance": instance, "data": {"n": n, **data}}


async def test_instance_app_gets_the_envelope_on_the_instance_channel(pusher, make_settings, tmp_path):
    pusher.add_app("101", "key-101", "s3cret")
    instance_file(tmp_path, "bot", "101", "s3cret")
    async with running(make_settings(**pusher_env(pusher, SERVER_URL="http://gw:8080"))) as app:
        event = {**upsert("bot", 1), "id": "id-1", "date_time": "2023-12-01T10:30:00.000Z"}
        assert (await post_ingest(app, [event]))[0] == 202
        [(app_id, channel, name, data)] = await pusher.wait_for(1)
    assert (app_id, channel, name) == ("101", "bot", "messages.upsert")
    assert data == (
        '{"event":"messages.upsert","instance":"bot","data":{"n":1},"destination":"101",'
        '"date_time":"2023-12-01T10:30:00.000Z","server_url":"http://gw:8080","apikey":null,"id":"id-1"}'
    )
    assert pusher.refused == [] and pusher.requests == ["/apps/101/events"]


async def test_global_and_instance_credentials_are_separate_clients(pusher, make_settings, tmp_path):
    pusher.add_app("1", "global-key", "global-secret")
    pusher.add_app("2", "key-2", "instance-secret")
    instance_file(tmp_path, "shop", "2", "instance-secret")
    env = pusher_env(
        pusher,
        PUSHER_GLOBAL_ENABLED="true",
        PUSHER_GLOBAL_APP_ID="1",
        PUSHER_GLOBAL_KEY="global-key",
        PUSHER_GLOBAL_SECRET="global-secret",
        PUSHER_GLOBAL_CLUSTER="eu",
        PUSHER_GLOBAL_USE_TLS="false",
        PUSHER_EVENTS_MESSAGES_UPSERT="true",
    )
    async with running(make_settings(**env)) as app:
        await post_ingest(app, [upsert("shop", 1), upsert("other", 2)])
        events = await pusher.wait_for(3)
    got = sorted((app_id, channel, orjson.loads(data)["destination"]) for app_id, channel, _, data in events)
    assert got == [("1", "other", "1"), ("1", "shop", "1"), ("2", "shop", "2")]
    assert pusher.refused == []


async def test_waiting_events_go_out_in_batches_of_ten(pusher, make_settings, tmp_path):
    pusher.add_app("7", "key-7", "s")
    instance_file(tmp_path, "bulk", "7", "s")
    async with running(make_settings(**pusher_env(pusher))) as app:
        # 25 conversations: each is one at a time, together they fill batches.
        await post_ingest(app, [upsert("bulk", n, key={"remoteJid": f"c{n}"}) for n in range(25)])
        events = await pusher.wait_for(25)
        requests = list(pusher.requests)
    assert sorted(orjson.loads(data)["data"]["n"] for *_, data in events) == list(range(25))
    assert "/apps/7/batch_events" in requests and len(requests) < 25, requests
    assert pusher.refused == []


async def test_base64_media_is_dropped_to_fit_and_too_large_is_a_dead_letter(pusher, make_settings, tmp_path):
    pusher.add_app("9", "key-9", "s")
    instance_file(tmp_path, "media", "9", "s")
    settings = make_settings(**pusher_env(pusher))
    async with running(settings) as app:
        with_media = upsert("media", 1, message={"imageMessage": {}, "base64": "A" * 20000})
        too_large = upsert("media", 2, text="x" * 12000)
        assert (await post_ingest(app, [with_media, too_large]))[0] == 202
        [(*_, data)] = await pusher.wait_for(1)
        async with asyncio.timeout(10):
            while not (dead := dead_letters(database_path(settings))):
                await asyncio.sleep(0.05)
    assert orjson.loads(data)["data"] == {"n": 1, "message": {"imageMessage": {}}}
    [letter] = dead
    assert letter["attempts"] == 1
    assert "over Pusher's 10240-byte limit" in letter["last_error"] and "12" in letter["last_error"]


async def test_4xx_is_permanent_and_429_or_5xx_are_retried(pusher, make_settings, tmp_path):
    pusher.add_app("5", "key-5", "s")
    instance_file(tmp_path, "flaky", "5", "s")
    settings = make_settings(**pusher_env(pusher))
    async with running(settings) as app:
        pusher.statuses.extend([429, 503])
        await post_ingest(app, [upsert("flaky", 1)])
        [(*_, data)] = await pusher.wait_for(1)
        pusher.statuses.append(403)
        await post_ingest(app, [upsert("flaky", 2)])
        async with asyncio.timeout(10):
            while not (dead := dead_letters(database_path(settings))):
                await asyncio.sleep(0.05)
    assert orjson.loads(data)["data"] == {"n": 1}
    [letter] = dead
    assert letter["attempts"] == 1 and "HTTP 403" in letter["last_error"]


async def test_a_wrong_secret_is_refused_by_the_signature_check(pusher, make_settings, tmp_path):
    pusher.add_app("3", "key-3", "right-secret")
    instance_file(tmp_path, "typo", "3", "wrong-secret")
    settings = make_settings(**pusher_env(pusher))
    async with running(settings) as app:
        await post_ingest(app, [upsert("typo", 1)])
        async with asyncio.timeout(10):
            while not (dead := dead_letters(database_path(settings))):
                await asyncio.sleep(0.05)
    assert pusher.refused == ["invalid auth_signature"] and pusher.events == []
    assert "HTTP 401: invalid auth_signature" in dead[0]["last_error"]


def test_an_instance_with_pusher_on_needs_its_credentials(tmp_path):
    write_instance(tmp_path, "bot", "pusher: {enabled: true, appId: 1, key: k}\n")
    loaded = load_instances(tmp_path)
    assert loaded.instances == {}
    assert any(
        "bot.yaml:1: pusher.enabled: pusher is enabled but has no secret" in p for p in loaded.problems
    ), loaded.problems
