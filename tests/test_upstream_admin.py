"""The admin API as scripts written for Evolution API 2.3.6 drive it: upstream's request bodies
(from its schemas and documentation) in, upstream's answers out, and the deliveries after."""

from __future__ import annotations

import yaml

from tests.conftest import admin, hook_env, post_ingest, running, wait_idle


async def test_create_with_the_usual_nested_webhook_is_enabled(receiver, make_settings, tmp_path):
    """Upstream treats a webhook given at create as enabled; most bodies do not say `enabled`."""
    body = {
        "instanceName": "shop",
        "qrcode": True,
        "integration": "WHATSAPP-BAILEYS",
        "webhook": {"url": f"{receiver.url}/shop", "byEvents": False, "events": ["MESSAGES_UPSERT"]},
    }
    async with running(make_settings()) as app:
        status, answer = await admin(app, "POST", "/instance/create", body)
        assert status == 201, answer
        assert answer["instance"]["status"] == "close"
        assert answer["webhook"]["webhookUrl"] == f"{receiver.url}/shop"
        assert "qrcode" not in answer  # asked for, but upstream's session runs elsewhere: not ours
        assert (await post_ingest(app, {"event": "messages.upsert", "instance": "shop", "data": {}}))[
            0
        ] == 202
        [got] = await receiver.wait_for(1, "/shop")
    assert got.json()["event"] == "messages.upsert"
    assert yaml.safe_load((tmp_path / "instances" / "shop.yaml").read_text())["webhook"]["enabled"] is True


async def test_flat_keys_of_the_instance_schema_are_applied_or_kept(
    receiver, make_settings, tmp_path, capsys
):
    body = {
        "instanceName": "flat",
        "token": "flat-token",
        "number": "5511999999999",
        "rejectCall": True,
        "msgCall": "busy",
        "groupsIgnore": True,
        "alwaysOnline": False,
        "readMessages": True,
        "readStatus": False,
        "syncFullHistory": False,
        "wavoipToken": "",
        "proxyHost": "proxy.local",
        "proxyPort": "3128",
        "proxyProtocol": "http",
        "webhookUrl": f"{receiver.url}/flat",
        "webhookByEvents": True,
        "webhookBase64": False,
        "webhookEvents": ["MESSAGES_UPSERT", "GROUP_UPDATE"],
        "rabbitmqEnabled": False,
        "rabbitmqEvents": [],
        "sqsEnabled": False,
        "sqsEvents": [],
        "natsEnabled": True,
        "natsEvents": ["CALL"],
        "chatwootAccountId": "1",
        "businessId": "biz-1",
        "someKeyNoSchemaHas": 1,  # neither upstream's nor ours: dropped with a warning, not a 400
    }
    async with running(make_settings(RABBITMQ_ENABLED="false")) as app:
        status, answer = await admin(app, "POST", "/instance/create", body)
        assert status == 201, answer
        assert answer["settings"] == {
            "rejectCall": True,
            "msgCall": "busy",
            "groupsIgnore": True,
            "alwaysOnline": False,
            "readMessages": True,
            "readStatus": False,
            "syncFullHistory": False,
            "wavoipToken": "",
        }
        assert (answer["nats"], answer["rabbitmq"], answer["sqs"]) == (
            {"enabled": True},
            {"enabled": False},
            {"enabled": False},
        )
        for event in ("messages.upsert", "groups.update"):
            assert (await post_ingest(app, {"event": event, "instance": "flat", "data": {}}))[0] == 202
        got = await receiver.wait_for(2)
        status, row = await admin(app, "GET", "/webhook/find/flat")
        assert row["events"] == ["MESSAGES_UPSERT", "GROUP_UPDATE"]  # as given, as upstream answers
        assert row["webhookByEvents"] is True
        status, [info] = await admin(app, "GET", "/instance/fetchInstances?number=5511999999999")
        assert (info["name"], info["businessId"], info["Nats"]["events"]) == ("flat", "biz-1", ["CALL"])
        assert info["Setting"]["msgCall"] == "busy"
    assert sorted(request.path for request in got) == ["/flat/groups-update", "/flat/messages-upsert"]
    written = yaml.safe_load((tmp_path / "instances" / "flat.yaml").read_text())
    assert written["proxyHost"] == "proxy.local" and written["chatwootAccountId"] == "1"
    assert "someKeyNoSchemaHas" not in written and "webhookUrl" not in written
    logged = capsys.readouterr().out
    assert "admin.keys_ignored" in logged and "someKeyNoSchemaHas" in logged


async def test_set_takes_snake_case_and_extra_keys(receiver, make_settings):
    async with running(make_settings()) as app:
        assert (await admin(app, "POST", "/instance/create", {"instanceName": "s"}))[0] == 201
        hook = {
            "enabled": True,
            "url": f"{receiver.url}/s",
            "webhook_by_events": True,
            "webhook_base64": True,
            "events": ["CALL"],
            "createdAt": "2026-01-01",  # a row fetched from upstream and posted back
        }
        status, row = await admin(app, "POST", "/webhook/set/s", {"webhook": hook})
        assert status == 201, row
        assert (row["webhookByEvents"], row["webhookBase64"]) == (True, True)
        assert (await post_ingest(app, {"event": "call", "instance": "s", "data": {}}))[0] == 202
        [got] = await receiver.wait_for(1, "/s/call")
    assert got.json()["event"] == "call"


async def test_dotted_instance_names_work(receiver, make_settings):
    async with running(make_settings(**hook_env(receiver, "INSTANCE_CREATE"))) as app:
        body = {"instanceName": "acme.sales", "webhook": {"url": f"{receiver.url}/acme", "events": ["CALL"]}}
        status, answer = await admin(app, "POST", "/instance/create", body)
        assert status == 201, answer
        assert (await post_ingest(app, {"event": "call", "instance": "acme.sales", "data": {}}))[0] == 202
        [call] = await receiver.wait_for(1, "/acme")
        [created] = await receiver.wait_for(1, "/hook")
        assert (await admin(app, "GET", "/webhook/find/acme.sales"))[0] == 200
    assert (call.json()["instance"], created.json()["instance"]) == ("acme.sales", "acme.sales")


async def test_answers_have_upstreams_fields_and_errors(make_settings):
    async with running(make_settings()) as app:
        status, created = await admin(
            app, "POST", "/instance/create", {"instanceName": "bot", "token": "tok"}
        )
        assert status == 201
        assert await admin(app, "GET", "/instance/fetchInstances", apikey="wrong") == (
            401,
            {"status": 401, "error": "Unauthorized", "response": {"message": "Unauthorized"}},
        )
        assert await admin(app, "GET", "/instance/nothingHere") == (
            404,
            {
                "status": 404,
                "error": "Not Found",
                "response": {"message": ["Cannot GET /instance/nothingHere"]},
            },
        )
        assert (await admin(app, "POST", "/webhook/find/bot", {}))[0] == 404  # a GET route, POSTed

        # The connection as the events the router accepted report it, whoever sent them.
        open_data = {
            "instance": "bot",
            "wuid": "5511900000000@s.whatsapp.net",
            "profileName": "Bot",
            "profilePictureUrl": "https://pps.whatsapp.net/p.jpg",
            "state": "open",
            "statusReason": 200,
        }
        assert (await post_ingest(app, {"event": "connection.update", "instance": "bot", "data": open_data}))[
            0
        ] == 202
        instance_id = created["instance"]["instanceId"]
        status, [info] = await admin(app, "GET", f"/instance/fetchInstances?instanceId={instance_id}")
        assert status == 200
        assert {
            key: info[key] for key in ("name", "connectionStatus", "ownerJid", "profileName", "profilePicUrl")
        } == {
            "name": "bot",
            "connectionStatus": "open",
            "ownerJid": "5511900000000@s.whatsapp.net",
            "profileName": "Bot",
            "profilePicUrl": "https://pps.whatsapp.net/p.jpg",
        }
        for key in ("integration", "number", "businessId", "token", "clientName", "disconnectionReasonCode",
                    "disconnectionObject", "disconnectionAt", "createdAt", "updatedAt", "Chatwoot", "Proxy",
                    "Rabbitmq", "Nats", "Sqs", "Websocket", "Setting", "_count"):  # fmt: skip
            assert key in info, key
        assert info["_count"] == {"Message": 0, "Contact": 0, "Chat": 0}
        assert await admin(app, "GET", "/instance/connectionState/bot", apikey="tok") == (
            200,
            {"instance": {"instanceName": "bot", "state": "open"}},
        )
        status, answer = await admin(app, "GET", "/instance/fetchInstances?instanceId=nope")
        assert (status, answer["response"]["message"]) == (404, ['Instance "nope" not found'])


async def test_delete_emits_instance_delete_then_remove_instance(receiver, make_settings):
    async with running(make_settings(**hook_env(receiver, "INSTANCE_DELETE", "REMOVE_INSTANCE"))) as app:
        assert (await admin(app, "POST", "/instance/create", {"instanceName": "gone"}))[0] == 201
        assert (await admin(app, "DELETE", "/instance/delete/gone"))[0] == 200
        got = await receiver.wait_for(2, "/hook")
        await wait_idle(app)
    assert [(r.json()["event"], r.json()["instance"]) for r in got] == [
        ("instance.delete", "gone"),
        ("remove.instance", "gone"),
    ]
    assert got[1].json()["data"] is None  # as upstream sends it
    assert len(receiver.on("/hook")) == 2
