"""The upstream-compatible admin API: real HTTP requests, the files written, the deliveries after."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import yaml

from tests.conftest import admin, hook_env, post_ingest, running

# `events: []` as upstream answers it (EventController.events: its order, GROUP_UPDATE), less
# APPLICATION_STARTUP, which "all events" does not include.
ALL_EVENTS = [
    "QRCODE_UPDATED",
    "MESSAGES_SET",
    "MESSAGES_UPSERT",
    "MESSAGES_EDITED",
    "MESSAGES_UPDATE",
    "MESSAGES_DELETE",
    "SEND_MESSAGE",
    "SEND_MESSAGE_UPDATE",
    "CONTACTS_SET",
    "CONTACTS_UPSERT",
    "CONTACTS_UPDATE",
    "PRESENCE_UPDATE",
    "CHATS_SET",
    "CHATS_UPSERT",
    "CHATS_UPDATE",
    "CHATS_DELETE",
    "GROUPS_UPSERT",
    "GROUP_UPDATE",
    "GROUP_PARTICIPANTS_UPDATE",
    "CONNECTION_UPDATE",
    "LABELS_EDIT",
    "LABELS_ASSOCIATION",
    "CALL",
    "TYPEBOT_START",
    "TYPEBOT_CHANGE_STATUS",
    "REMOVE_INSTANCE",
    "LOGOUT_INSTANCE",
    "INSTANCE_CREATE",
    "INSTANCE_DELETE",
    "STATUS_INSTANCE",
]


def files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def test_create_writes_the_file_and_the_instance_works_at_once(receiver, make_settings, tmp_path):
    env = hook_env(receiver, "INSTANCE_CREATE")
    body = {
        "instanceName": "bot",
        "integration": "WHATSAPP-BAILEYS",
        "token": "bot-token",
        "qrcode": True,
        "rejectCall": True,
        "webhook": {
            "enabled": True,
            "url": f"{receiver.url}/bot",
            "byEvents": False,
            "base64": False,
            "headers": {"X-Instance": "bot"},
            "events": ["MESSAGES_UPSERT", "INSTANCE_CREATE"],
        },
        "rabbitmq": {"enabled": False, "events": []},
    }
    instances = tmp_path / "instances"
    async with running(make_settings(**env)) as app:
        status, answer = await admin(app, "POST", "/instance/create", body)
        assert status == 201, answer
        instance_id = answer["instance"]["instanceId"]
        assert answer["instance"] | {"instanceId": None} == {
            "instanceName": "bot",
            "instanceId": None,
            "integration": "WHATSAPP-BAILEYS",
            "webhookWaBusiness": None,
            "accessTokenWaBusiness": "",
            "status": "close",  # upstream's connection state: nothing has connected yet
        }
        assert answer["hash"] == "bot-token"
        assert answer["webhook"] == {
            "webhookUrl": f"{receiver.url}/bot",
            "webhookHeaders": {"X-Instance": "bot"},
            "webhookByEvents": False,
            "webhookBase64": False,
        }
        assert answer["rabbitmq"] == {"enabled": False}
        assert answer["settings"]["rejectCall"] is True

        # The file: upstream's body, with the id and token it was given; nothing else left behind.
        assert files(instances) == ["bot.yaml"]
        path = instances / "bot.yaml"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        written = yaml.safe_load(path.read_text())
        assert written["instanceName"] == "bot" and written["instanceId"] == instance_id
        assert written["token"] == "bot-token" and written["qrcode"] is True
        assert written["webhook"]["headers"] == {"X-Instance": "bot"}

        # instance.create reaches the global webhook and the new instance's own.
        [created_global] = await receiver.wait_for(1, "/hook")
        [created_own] = await receiver.wait_for(1, "/bot")
        for request in (created_global, created_own):
            assert request.json()["event"] == "instance.create"
            assert request.json()["instance"] == "bot"
            assert request.json()["data"] == {"instanceName": "bot", "instanceId": instance_id}

        # Routed without a reload signal.
        assert (await post_ingest(app, {"event": "messages.upsert", "instance": "bot", "data": {}}))[0] == 202
        [_, message] = await receiver.wait_for(2, "/bot")
        assert message.json()["event"] == "messages.upsert"
        assert message.headers["X-Instance"] == "bot"

        status, answer = await admin(app, "POST", "/instance/create", {"instanceName": "bot"})
        assert (status, answer["response"]["message"]) == (403, ['This name "bot" is already in use.'])

    # The file is the configuration: a restart has the instance as created.
    async with running(make_settings(**env)) as app:
        assert app.instances["bot"].id == instance_id


async def test_set_and_find_every_sink(receiver, make_settings, tmp_path):
    path = tmp_path / "instances" / "shop.yaml"
    async with running(make_settings()) as app:
        status, answer = await admin(app, "POST", "/instance/create", {"instanceName": "shop", "token": "t"})
        assert status == 201, answer
        instance_id = answer["instance"]["instanceId"]
        assert await admin(app, "GET", "/webhook/find/shop") == (200, None)

        hook = {"enabled": True, "url": f"{receiver.url}/shop", "events": ["CALL"]}
        status, row = await admin(app, "POST", "/webhook/set/shop", {"webhook": hook})
        assert status == 201, row
        assert row | {"id": None} == {
            "id": None,
            "enabled": True,
            "events": ["CALL"],
            "url": f"{receiver.url}/shop",
            "headers": None,
            "webhookByEvents": False,
            "webhookBase64": False,
            "instanceId": instance_id,
        }
        assert await admin(app, "GET", "/webhook/find/shop") == (200, row)
        assert yaml.safe_load(path.read_text())["webhook"] == hook
        assert (await post_ingest(app, {"event": "call", "instance": "shop", "data": {}}))[0] == 202
        await receiver.wait_for(1, "/shop")

        # events: [] is every event (upstream expands it); the file keeps [] so new events count too.
        status, row = await admin(
            app, "POST", "/websocket/set/shop", {"websocket": {"enabled": True, "events": []}}
        )
        assert (status, row["enabled"], row["events"]) == (201, True, ALL_EVENTS)
        assert yaml.safe_load(path.read_text())["websocket"] == {"enabled": True, "events": []}
        for sink in ("rabbitmq", "sqs"):
            status, row = await admin(
                app, "POST", f"/{sink}/set/shop", {sink: {"enabled": True, "events": ["CALL"]}}
            )
            assert (status, row["events"]) == (201, ["CALL"])
            assert await admin(app, "GET", f"/{sink}/find/shop") == (200, row)
        pusher = {"enabled": True, "appId": "42", "key": "k", "secret": "s", "cluster": "eu", "useTLS": True}
        status, row = await admin(app, "POST", "/pusher/set/shop", {"pusher": {**pusher, "events": []}})
        assert status == 201, row
        assert {key: row[key] for key in pusher} == pusher and row["events"] == ALL_EVENTS

        # Upstream's older flat body works too; keys not sent keep their value; disabled = no events.
        status, row = await admin(app, "POST", "/webhook/set/shop", {"enabled": False})
        assert (status, row["enabled"], row["events"], row["url"]) == (201, False, [], f"{receiver.url}/shop")
        assert app.routes.targets_for("shop", "call") == ()

        status, listing = await admin(app, "GET", "/instance/fetchInstances")
        assert status == 200 and [item["name"] for item in listing] == ["shop"]
        [info] = listing
        assert info["id"] == instance_id and info["token"] == "t"
        assert info["connectionStatus"] == "close"  # no connection.update seen
        assert info["Webhook"]["enabled"] is False and info["Websocket"]["events"] == ALL_EVENTS
        assert info["Pusher"]["appId"] == "42"


async def test_invalid_changes_are_refused_naming_the_field_and_write_nothing(make_settings, tmp_path):
    instances = tmp_path / "instances"
    async with running(make_settings()) as app:
        assert (await admin(app, "POST", "/instance/create", {"instanceName": "shop"}))[0] == 201
        before = (instances / "shop.yaml").read_bytes()

        bad_hook = {"webhook": {"enabled": True, "url": "ftp://x", "events": ["MESSAGES_UPSERT", "NOPE"]}}
        status, answer = await admin(app, "POST", "/webhook/set/shop", bad_hook)
        assert status == 400
        assert answer["error"] == "Bad Request"
        assert set(answer["response"]["message"]) == {
            "webhook.url: must be an http:// or https:// URL, got 'ftp://x'",
            "webhook.events[1]: unknown event 'NOPE'",
        }
        status, answer = await admin(
            app, "POST", "/pusher/set/shop", {"pusher": {"enabled": True, "appId": "1"}}
        )
        assert status == 400
        assert answer["response"]["message"] == [
            "pusher.enabled: pusher is enabled but has no key",
            "pusher.enabled: pusher is enabled but has no secret",
        ]
        status, answer = await admin(app, "POST", "/sqs/set/shop", {"nothing": 1})
        assert status == 400 and answer["response"]["message"][0].startswith("sqs: is required")
        status, answer = await admin(app, "POST", "/webhook/set/shop", raw=b"{nope")
        assert status == 400 and answer["response"]["message"][0].startswith("malformed JSON")
        assert (instances / "shop.yaml").read_bytes() == before

        status, answer = await admin(app, "POST", "/instance/create", {"instanceName": "../evil"})
        assert (status, answer["response"]["message"]) == (
            400,
            ["instanceName: must not contain '/' or '\\'"],
        )
        status, answer = await admin(app, "POST", "/instance/create", {"instanceName": "x", "webhook": "on"})
        assert status == 400 and answer["response"]["message"][0].startswith("webhook: "), answer
        status, answer = await admin(app, "POST", "/instance/create", {"integration": "WHATSAPP-BAILEYS"})
        assert (status, answer["response"]["message"]) == (400, ["instanceName: is required"])
        assert await admin(app, "POST", "/webhook/set/nobody", {"webhook": {"enabled": False}}) == (
            404,
            {
                "status": 404,
                "error": "Not Found",
                "response": {"message": ['The "nobody" instance does not exist']},
            },
        )
        assert files(instances) == ["shop.yaml"] and not (tmp_path / "evil.yaml").exists()
        assert set(app.instances) == {"shop"}


async def test_keys_global_for_everything_an_instance_token_for_its_own_instance(make_settings):
    async with running(make_settings()) as app:
        for name in ("bot", "shop"):
            body = {"instanceName": name, "token": f"{name}-token", "sqs": {"enabled": False}}
            assert (await admin(app, "POST", "/instance/create", body))[0] == 201
        assert (await admin(app, "GET", "/sqs/find/bot", apikey=None))[0] == 401
        assert (await admin(app, "GET", "/sqs/find/bot", apikey="wrong"))[0] == 401
        assert (await admin(app, "GET", "/sqs/find/bot", apikey="bot-token"))[0] == 200
        assert (await admin(app, "GET", "/sqs/find/shop", apikey="bot-token"))[0] == 401
        sqs_off = {"sqs": {"enabled": False}}
        assert (await admin(app, "POST", "/sqs/set/shop", sqs_off, apikey="bot-token"))[0] == 401
        assert (await admin(app, "DELETE", "/instance/delete/shop", apikey="bot-token"))[0] == 401
        assert (await admin(app, "POST", "/instance/create", {"instanceName": "z"}, apikey="bot-token"))[
            0
        ] == 401

        status, listing = await admin(app, "GET", "/instance/fetchInstances", apikey="bot-token")
        assert (status, [item["name"] for item in listing]) == (200, ["bot"])
        status, listing = await admin(app, "GET", "/instance/fetchInstances")
        assert (status, [item["name"] for item in listing]) == (200, ["bot", "shop"])
        status, listing = await admin(app, "GET", "/instance/fetchInstances?instanceName=shop")
        assert (status, [item["name"] for item in listing]) == (200, ["shop"])
        status, answer = await admin(app, "GET", "/instance/fetchInstances?instanceName=nope")
        assert (status, answer["response"]["message"]) == (404, ['Instance "nope" not found'])
        assert (await admin(app, "GET", "/instance/fetchInstances?instanceName=shop", apikey="bot-token"))[
            0
        ] == 401


async def test_delete_emits_instance_delete_to_the_instance_itself_then_removes_it(
    receiver, make_settings, tmp_path
):
    env = hook_env(receiver, "INSTANCE_DELETE", "CALL")
    async with running(make_settings(**env)) as app:
        hook = {"enabled": True, "url": f"{receiver.url}/old", "events": ["INSTANCE_DELETE", "CALL"]}
        status, created = await admin(
            app, "POST", "/instance/create", {"instanceName": "old", "webhook": hook}
        )
        assert status == 201
        status, answer = await admin(app, "DELETE", "/instance/delete/old")
        assert (status, answer) == (
            200,
            {"status": "SUCCESS", "error": False, "response": {"message": "Instance deleted"}},
        )
        assert files(tmp_path / "instances") == []
        assert "old" not in app.instances
        expected = {"instanceName": "old", "instanceId": created["instance"]["instanceId"]}
        for path in ("/old", "/hook"):
            [deleted] = await receiver.wait_for(1, path)
            assert (deleted.json()["event"], deleted.json()["data"]) == ("instance.delete", expected)
        # Its events now go to the global webhook only.
        assert app.routes.targets_for("old", "call") == ("webhook:global",)
        assert (await admin(app, "DELETE", "/instance/delete/old"))[0] == 404


async def test_concurrent_changes_are_applied_one_at_a_time(make_settings, tmp_path):
    async with running(make_settings()) as app:
        creates = [admin(app, "POST", "/instance/create", {"instanceName": f"i{n}"}) for n in range(12)]
        assert [status for status, _ in await asyncio.gather(*creates)] == [201] * 12
        sets = [
            admin(app, "POST", f"/sqs/set/i{n}", {"sqs": {"enabled": True, "events": ["CALL"]}})
            for n in range(12)
        ]
        assert [status for status, _ in await asyncio.gather(*sets)] == [201] * 12
        assert len(app.instances) == 12
        assert all(config.section("sqs").enabled for config in app.instances.values())
    assert files(tmp_path / "instances") == sorted(f"i{n}.yaml" for n in range(12))
