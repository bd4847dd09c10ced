"""The webhook sink, asserted on what a real receiver on loopback got."""

from __future__ import annotations

import time
import warnings
from datetime import datetime
from pathlib import Path

import jwt
import orjson
from jwt.warnings import InsecureKeyLengthWarning

from tests.conftest import API_KEY, post_ingest, running, wait_idle, write_instance

MESSAGE = {
    "key": {"remoteJid": "5511999999999@s.whatsapp.net", "fromMe": False, "id": "3EB0C767D82B632A2E4A"},
    "message": {"conversation": "Hello World!"},
    "messageTimestamp": 1640995200,
    "pushName": "John Doe",
}


def upsert(instance: str = "bot", **extra: object) -> dict[str, object]:
    return {"event": "messages.upsert", "instance": instance, "data": MESSAGE, **extra}


async def test_global_webhook_receives_the_exact_envelope(receiver, make_settings):
    settings = make_settings(
        WEBHOOK_GLOBAL_ENABLED="true",
        WEBHOOK_GLOBAL_URL=f"{receiver.url}/hook",
        WEBHOOK_EVENTS_MESSAGES_UPSERT="true",
        SERVER_URL="http://gateway.example:8080",
    )
    async with running(settings) as app:
        payload = upsert(
            sender="5511888888888@s.whatsapp.net", date_time="2023-12-01T10:30:00.000Z", id="evt-1"
        )
        status, answer = await post_ingest(app, payload)
        assert (status, answer["ids"]) == (202, ["evt-1"])
        [got] = await receiver.wait_for(1, "/hook")
    assert got.method == "POST"
    assert got.headers["Content-Type"] == "application/json"
    expected = (
        b'{"event":"messages.upsert","instance":"bot","data":'
        + orjson.dumps(MESSAGE)
        + b',"destination":"'
        + receiver.url.encode()
        + b'/hook","date_time":"2023-12-01T10:30:00.000Z"'
        b',"sender":"5511888888888@s.whatsapp.net","server_url":"http://gateway.example:8080"'
        b',"apikey":null,"id":"evt-1"}'
    )
    assert got.body == expected


async def test_envelope_omits_unknown_sender_and_stamps_true_utc(receiver, make_settings):
    settings = make_settings(
        WEBHOOK_GLOBAL_ENABLED="1", WEBHOOK_GLOBAL_URL=receiver.url, WEBHOOK_EVENTS_MESSAGES_UPSERT="yes"
    )
    async with running(settings) as app:
        before = time.time()
        await post_ingest(app, upsert())
        [got] = await receiver.wait_for(1)
    body = got.json()
    assert list(body) == ["event", "instance", "data", "destination", "date_time", "apikey", "id"]
    stamped = body["date_time"]
    assert stamped.endswith("Z") and len(stamped) == len("2023-12-01T10:30:00.000Z")
    moment = datetime.fromisoformat(stamped.replace("Z", "+00:00")).timestamp()
    assert before - 1 <= moment <= time.time() + 1
    assert len(body["id"]) == 36


async def test_by_events_suffix_on_global_and_instance(receiver, make_settings, tmp_path: Path):
    write_instance(
        tmp_path / "instances",
        "shop",
        f"instanceName: shop\nwebhook:\n  enabled: true\n  url: {receiver.url}/inst/\n"
        "  byEvents: true\n  events: [CONNECTION_UPDATE, GROUP_UPDATE]\n",
    )
    settings = make_settings(
        WEBHOOK_GLOBAL_ENABLED="true",
        WEBHOOK_GLOBAL_URL=f"{receiver.url}/glob",
        WEBHOOK_GLOBAL_WEBHOOK_BY_EVENTS="true",
        WEBHOOK_EVENTS_CONNECTION_UPDATE="true",
        WEBHOOK_EVENTS_GROUPS_UPDATE="true",
    )
    async with running(settings) as app:
        await post_ingest(
            app,
            [
                {"event": "connection.update", "instance": "shop", "data": {"state": "open"}},
                {"event": "groups.update", "instance": "shop", "data": []},
            ],
        )
        await receiver.wait_for(4)
    paths = sorted(r.path for r in receiver.requests)
    assert paths == [
        "/glob/connection-update",
        "/glob/groups-update",
        "/inst/connection-update",
        "/inst/groups-update",
    ]
    destinations = {r.json()["destination"] for r in receiver.on("/inst/connection-update")}
    assert destinations == {f"{receiver.url}/inst/"}


async def test_instance_headers_verbatim_and_jwt_bearer(receiver, make_settings, tmp_path: Path):
    write_instance(
        tmp_path / "instances",
        "bot",
        f"webhook:\n  enabled: true\n  url: {receiver.url}/i\n"
        "  headers: {X-Instance: production-bot, X-Trace: abc 123, jwt_key: s3cret}\n"
        "  events: [MESSAGES_UPSERT]\n",
    )
    async with running(make_settings()) as app:
        await post_ingest(app, upsert())
        [got] = await receiver.wait_for(1, "/i")
    assert got.headers["X-Instance"] == "production-bot"
    assert got.headers["X-Trace"] == "abc 123"
    assert "jwt_key" not in {k.lower() for k in got.headers}
    scheme, token = got.headers["Authorization"].split(" ")
    assert scheme == "Bearer"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)  # upstream-style short key
        claims = jwt.decode(token, "s3cret", algorithms=["HS256"])
    assert claims["app"] == "evolution" and claims["action"] == "webhook"
    assert claims["exp"] == claims["iat"] + 600
    assert abs(claims["iat"] - time.time()) < 10


async def test_global_and_instance_both_receive_and_filters_apply(receiver, make_settings, tmp_path):
    write_instance(
        tmp_path / "instances",
        "bot",
        f"webhook: {{enabled: true, url: '{receiver.url}/i', events: [MESSAGES_UPSERT]}}\n",
    )
    settings = make_settings(
        WEBHOOK_GLOBAL_ENABLED="true",
        WEBHOOK_GLOBAL_URL=f"{receiver.url}/g",
        WEBHOOK_EVENTS_CONNECTION_UPDATE="true",
    )
    async with running(settings) as app:
        await post_ingest(
            app,
            [
                upsert(),
                {"event": "connection.update", "instance": "bot", "data": {"state": "open"}},
                {"event": "presence.update", "instance": "bot", "data": {}},
                {"event": "connection.update", "instance": "unconfigured", "data": {"state": "close"}},
            ],
        )
        await receiver.wait_for(3)
        await wait_idle(app)  # a wrongly routed extra delivery would have been made by now
    got = sorted((r.path, r.json()["event"], r.json()["instance"]) for r in receiver.requests)
    assert got == [
        ("/g", "connection.update", "bot"),
        ("/g", "connection.update", "unconfigured"),
        ("/i", "messages.upsert", "bot"),
    ]


async def test_disabled_instance_webhook_gets_nothing(receiver, make_settings, tmp_path):
    write_instance(tmp_path / "instances", "off", f"webhook: {{enabled: false, url: '{receiver.url}/off'}}\n")
    write_instance(tmp_path / "instances", "on", f"webhook: {{enabled: true, url: '{receiver.url}/on'}}\n")
    async with running(make_settings()) as app:
        await post_ingest(app, [upsert("off"), upsert("on")])
        await receiver.wait_for(1, "/on")
        await wait_idle(app)
    assert receiver.on("/off") == []


async def test_base64_kept_or_removed_per_webhook(receiver, make_settings, tmp_path):
    for name, flag in (("keep", "true"), ("drop", "false")):
        write_instance(
            tmp_path / "instances",
            name,
            f"webhook: {{enabled: true, url: '{receiver.url}/{name}', base64: {flag}}}\n",
        )
    media = {"key": {"id": "M1"}, "message": {"imageMessage": {"caption": "hi"}, "base64": "aGVsbG8="}}
    async with running(make_settings()) as app:
        await post_ingest(
            app,
            [
                {"event": "messages.upsert", "instance": "keep", "data": media},
                {"event": "messages.upsert", "instance": "drop", "data": media},
            ],
        )
        await receiver.wait_for(2)  # the message, to each ("all events" leaves application.startup out)

    def message_to(path: str) -> dict[str, object]:
        [body] = [r.json() for r in receiver.on(path) if r.json()["event"] == "messages.upsert"]
        return body["data"]["message"]

    assert message_to("/keep")["base64"] == "aGVsbG8="
    assert message_to("/drop") == {"imageMessage": {"caption": "hi"}}


async def test_apikey_is_the_instance_token_only_when_exposed(receiver, make_settings, tmp_path):
    write_instance(
        tmp_path / "instances",
        "bot",
        f"token: inst-token\nwebhook: {{enabled: true, url: '{receiver.url}/i',"
        " events: [MESSAGES_UPSERT]}\n",
    )
    async with running(make_settings(AUTHENTICATION_EXPOSE_IN_FETCH_INSTANCES="true")) as app:
        await post_ingest(app, upsert(apikey="something-else"))
        [got] = await receiver.wait_for(1)
    assert got.json()["apikey"] == "inst-token"
    async with running(make_settings(AUTHENTICATION_EXPOSE_IN_FETCH_INSTANCES="false")) as app:
        await post_ingest(app, upsert(apikey="something-else"))
        [_, got] = await receiver.wait_for(2)
    assert got.json()["apikey"] is None


async def test_instance_token_authorises_its_own_instance_only(receiver, make_settings, tmp_path):
    write_instance(
        tmp_path / "instances",
        "bot",
        f"token: inst-token\nwebhook: {{enabled: true, url: '{receiver.url}/i',"
        " events: [MESSAGES_UPSERT]}\n",
    )
    async with running(make_settings()) as app:
        assert (await post_ingest(app, upsert("bot"), apikey="inst-token"))[0] == 202
        status, body = await post_ingest(app, upsert("other"), apikey="inst-token")
        assert status == 401 and "other" in body["error"]
        await receiver.wait_for(1)
    assert API_KEY not in receiver.requests[0].body.decode()


async def test_application_startup_is_emitted_once_when_the_daemon_is_up(receiver, make_settings):
    settings = make_settings(
        WEBHOOK_GLOBAL_ENABLED="true",
        WEBHOOK_GLOBAL_URL=f"{receiver.url}/g",
        WEBHOOK_EVENTS_APPLICATION_STARTUP="true",
        SERVER_NAME="router-7",
    )
    async with running(settings) as app:
        [got] = await receiver.wait_for(1, "/g")
        await wait_idle(app)
        assert len(receiver.requests) == 1
    body = got.json()
    assert (body["event"], body["instance"]) == ("application.startup", "router-7")
    assert body["data"]["status"] == "started"


async def test_one_target_with_concurrency_1_receives_in_intake_order(receiver, make_settings):
    # Deliveries that wait in the store and deliveries handed to the worker directly: neither
    # path may overtake the other. The first batch is more than the worker holds (256 x its
    # concurrency), so it is stored; the batches right after it race the worker reading it
    # back; those after the receiver has caught up are handed over.
    receiver.script("/hook", [("sleep", 0.001)] * 2000)  # 1 ms an event: posting is faster
    settings = make_settings(
        WEBHOOK_GLOBAL_ENABLED="true",
        WEBHOOK_GLOBAL_URL=f"{receiver.url}/hook",
        WEBHOOK_EVENTS_CALL="true",
        ROUTER_WEBHOOK_CONCURRENCY="1",
    )

    def events(first: int, last: int) -> list[dict[str, object]]:
        return [{"event": "call", "instance": "bot", "data": {"n": n}} for n in range(first, last)]

    async with running(settings) as app:
        assert (await post_ingest(app, events(0, 1000)))[0] == 202
        for start in range(1000, 1200, 10):
            assert (await post_ingest(app, events(start, start + 10)))[0] == 202
            if start == 1100:
                await receiver.wait_for(1110, timeout=30)  # drained: the worker is caught up again
        got = await receiver.wait_for(1200, timeout=30)
        assert app.dispatcher is not None
        assert 0 < app.dispatcher.handed_over <= 200, "both paths were used"
    assert [r.json()["data"]["n"] for r in got] == list(range(1200))
