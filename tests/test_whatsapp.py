"""The live WhatsApp session adapter (neonize), with the Go core replaced at its ctypes boundary.

Events are neonize's own protobuf types, serialized and handed to the library's callbacks as
the Go core does; what reaches a real webhook receiver is asserted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import sqlite3
import subprocess
import sys
from typing import Any

import neonize.aioze.client as neonize_client
import pytest
from neonize.proto import Neonize_pb2 as proto
from neonize.proto.waCommon.WACommon_pb2 import MessageKey
from neonize.proto.waE2E import WAWebProtobufsE2E_pb2 as wa

from router.adapters import whatsapp
from router.errors import ConfigError
from tests.conftest import ROOT, admin, post_ingest, running, write_instance
from tests.whatsapp_core import FakeGoCore, wait_until

BOT = b"bot"
ME = proto.JID(User="5511900000000", Server="s.whatsapp.net")
JOHN = proto.JID(User="5511999999999", Server="s.whatsapp.net")
MARY = proto.JID(User="5511888888888", Server="s.whatsapp.net")
GROUP = proto.JID(User="120363000000000000", Server="g.us")
SESSION_FILE = (
    "integration: WHATSAPP-WHATSMEOW\nwebhook: {{enabled: true, url: '{url}/{name}', events: []}}\n"
)


@pytest.fixture
def core(monkeypatch: pytest.MonkeyPatch) -> FakeGoCore:
    fake = FakeGoCore()
    monkeypatch.setattr(neonize_client, "gocode", fake)
    return fake


def session_instance(tmp_path, receiver, name: str = "bot", extra: str = "") -> None:
    write_instance(tmp_path / "instances", name, SESSION_FILE.format(url=receiver.url, name=name) + extra)


async def events_at(receiver, path: str, count: int) -> list[dict[str, Any]]:
    """The first ``count`` events of the session at ``path`` (``application.startup`` left out)."""

    def from_session() -> list[dict[str, Any]]:
        events = (request.json() for request in receiver.on(path))
        return [event for event in events if event["event"] != "application.startup"]

    await wait_until(lambda: len(from_session()) >= count)
    return from_session()[:count]


async def accepted_at(receiver, path: str, count: int) -> list[dict[str, Any]]:
    """``count`` events at ``path`` in the order they were accepted (their ids are time-ordered):
    each chat, and the instance's own events, arrive in order; chats and instance in parallel."""
    return sorted(await events_at(receiver, path, count), key=lambda event: event["id"])


def info(
    message_id: str, chat=JOHN, sender=JOHN, from_me=False, group=False, push="John"
) -> proto.MessageInfo:
    source = proto.MessageSource(Chat=chat, Sender=sender, IsFromMe=from_me, IsGroup=group)
    return proto.MessageInfo(MessageSource=source, ID=message_id, Pushname=push, Timestamp=1700000000)


async def connect(core: FakeGoCore, uuid: bytes = BOT) -> None:
    await core.wait_connects(uuid, 1)
    core.emit(uuid, proto.Device(JID=ME, PushName="Shop"))
    core.emit(uuid, proto.Connected(status=True))


async def test_lifecycle_qr_open_reconnect_logout_and_stop(core, receiver, make_settings, tmp_path):
    session_instance(tmp_path, receiver)
    async with running(make_settings()) as app:
        await core.wait_connects(BOT, 1)
        assert core.sessions[BOT].database == str(tmp_path / "state" / "whatsapp" / "bot.db")
        [connecting] = await events_at(receiver, "/bot", 1)
        assert (connecting["event"], connecting["data"]) == (
            "connection.update",
            {"instance": "bot", "state": "connecting", "statusReason": 200},
        )

        core.qr(BOT, "2@AbC,dEf,GhI")
        qr = (await events_at(receiver, "/bot", 2))[1]
        assert qr["event"] == "qrcode.updated"
        shown = qr["data"]["qrcode"]
        assert (shown["instance"], shown["code"], shown["pairingCode"]) == ("bot", "2@AbC,dEf,GhI", None)
        assert shown["base64"].startswith("data:image/png;base64,")
        assert base64.b64decode(shown["base64"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"

        core.emit(BOT, proto.PairStatus(ID=ME))
        await connect(core)
        opened = (await events_at(receiver, "/bot", 3))[2]
        assert opened["data"] == {
            "instance": "bot",
            "wuid": "5511900000000@s.whatsapp.net",
            "profileName": "Shop",
            "profilePictureUrl": None,
            "state": "open",
            "statusReason": 200,
        }
        assert opened["sender"] == "5511900000000@s.whatsapp.net"
        status, [listed] = await admin(app, "GET", "/instance/fetchInstances")
        assert (status, listed["connectionStatus"], listed["ownerJid"], listed["profileName"]) == (
            200,
            "open",
            "5511900000000@s.whatsapp.net",
            "Shop",
        )

        # A dropped connection (whatsmeow reconnects by itself), then the client failing outright.
        core.emit(BOT, proto.Disconnected(status=True))
        assert (await events_at(receiver, "/bot", 4))[3]["data"]["state"] == "connecting"
        core.fail(BOT, "websocket: close 1006 (abnormal closure)")
        await core.wait_connects(BOT, 2)  # connected again, by itself, after a pause
        got = await events_at(receiver, "/bot", 6)
        assert [(e["data"]["state"], e["data"]["statusReason"]) for e in got[4:]] == [
            ("close", 428),
            ("connecting", 200),
        ]

        # Logged out from the phone: logout.instance, closed for good, no reconnecting.
        core.emit(
            BOT, proto.LoggedOut(OnConnect=False, Reason=proto.ConnectFailureReason.Value("LOGGED_OUT"))
        )
        got = await events_at(receiver, "/bot", 8)
        assert (got[6]["event"], got[6]["data"]) == ("logout.instance", None)
        assert (got[7]["event"], got[7]["data"]["state"], got[7]["data"]["statusReason"]) == (
            "connection.update",
            "close",
            401,
        )
        assert app.whatsapp is not None
        await wait_until(app.whatsapp._tasks["bot"].done)
        assert core.connects[BOT] == 2

        # The next reload starts it again, to be paired anew.
        await app.reload()
        await core.wait_connects(BOT, 3)
        # Nothing left of the earlier clients may stop the new session (neonize stops a client's
        # uuid when the client object is collected; every client here has the uuid "bot").
        gc.collect()
        assert not core.sessions[BOT].ended.is_set()
    # Stopping the daemon stopped the session (the Go call returned).
    assert core.sessions[BOT].ended.is_set()


async def test_pairing_by_phone_number(core, receiver, make_settings, tmp_path):
    session_instance(tmp_path, receiver, extra="number: '5511977776666'\n")
    async with running(make_settings()):
        await core.wait_connects(BOT, 1)
        core.qr(BOT, "2@first")
        core.qr(BOT, "2@second")
        got = await events_at(receiver, "/bot", 3)
    first, second = got[1]["data"]["qrcode"], got[2]["data"]["qrcode"]
    assert (first["code"], first["pairingCode"]) == ("2@first", "ABCD-1234")
    assert (second["code"], second["pairingCode"]) == ("2@second", None)  # one code per connection
    assert core.paired == [(BOT, "5511977776666")]


async def test_whatsapp_events_arrive_in_upstream_shapes(core, receiver, make_settings, tmp_path):
    session_instance(tmp_path, receiver)
    async with running(make_settings()) as app:
        await connect(core)
        start = len(await events_at(receiver, "/bot", 2))  # connecting, open
        instance_id = app.instances["bot"].id

        hello = proto.Message(Info=info("3EB0AAAAAAAAAAAAAAAAAA"), Message=wa.Message(conversation="Hello"))
        again = proto.Message(Info=info("3EB0BBBBBBBBBBBBBBBBBB"), Message=wa.Message(conversation="Again"))
        quoted = wa.ContextInfo(stanzaID="3EB0AAAAAAAAAAAAAAAAAA", participant="5511999999999@s.whatsapp.net")
        reply = wa.Message(extendedTextMessage=wa.ExtendedTextMessage(text="Re", contextInfo=quoted))
        image = wa.Message(
            imageMessage=wa.ImageMessage(
                URL="https://mmg.whatsapp.net/x", mimetype="image/jpeg", fileSHA256=b"\x01"
            )
        )
        revoke = wa.ProtocolMessage(
            key=MessageKey(remoteJID="5511999999999@s.whatsapp.net", fromMe=True, ID="3EB0CCCC"),
            type=wa.ProtocolMessage.Type.Value("REVOKE"),
        )
        edit = wa.ProtocolMessage(
            key=MessageKey(remoteJID="5511999999999@s.whatsapp.net", fromMe=True, ID="3EB0DDDD"),
            type=wa.ProtocolMessage.Type.Value("MESSAGE_EDIT"),
            editedMessage=wa.Message(conversation="fixed"),
        )
        group_source = proto.MessageSource(Chat=GROUP, Sender=MARY, IsGroup=True)
        group_info = proto.GroupInfo(
            JID=GROUP,
            OwnerJID=ME,
            GroupName=proto.GroupName(Name="Team", NameSetAt=1700000000),
            GroupTopic=proto.GroupTopic(Topic="Weekly"),
            GroupCreated=1690000000,
            Participants=[
                proto.GroupParticipant(JID=ME, IsSuperAdmin=True),
                proto.GroupParticipant(JID=MARY),
            ],
        )
        offer = proto.CallOffer(
            basicCallMeta=proto.BasicCallMeta(timestamp=1700000100, callID="CALL1", **{"from": JOHN}),
            data=proto.Node(Tag="offer", Nodes=[proto.Node(Tag="video")]),
        )
        feed = [
            hello,
            again,
            proto.Message(Info=info("3EB0EEEEEEEEEEEEEEEEEE"), Message=reply),
            proto.Message(
                Info=info("3A0000000000000000FF", chat=GROUP, sender=MARY, group=True, push="Mary"),
                Message=image,
            ),
            proto.Message(
                Info=info("3EB0FFFF", from_me=True, sender=ME), Message=wa.Message(protocolMessage=revoke)
            ),
            proto.Message(
                Info=info("3EB0GGGG", from_me=True, sender=ME), Message=wa.Message(protocolMessage=edit)
            ),
            proto.Receipt(
                MessageSource=proto.MessageSource(Chat=JOHN, Sender=JOHN),
                MessageIDs=["3EB0M1", "3EB0M2"],
                Type=proto.Receipt.ReceiptType.Value("READ"),
            ),
            proto.Presence(From=JOHN, Unavailable=False, LastSeen=1700000200),
            proto.ChatPresence(
                MessageSource=group_source,
                State=proto.ChatPresence.ChatPresence.Value("COMPOSING"),
                Media=proto.ChatPresence.ChatPresenceMedia.Value("AUDIO"),
            ),
            proto.JoinedGroup(GroupInfo=group_info),
            proto.GroupInfoEvent(JID=GROUP, Sender=ME, Join=[JOHN], Name=proto.GroupName(Name="Team 2")),
            offer,
        ]
        for event in feed:
            core.emit(BOT, event)
        got = (await accepted_at(receiver, "/bot", start + 18))[start:]

    sender = "5511900000000@s.whatsapp.net"
    assert {event["sender"] for event in got} == {sender}
    assert {event["instance"] for event in got} == {"bot"}
    kinds = [event["event"] for event in got]
    assert kinds == [
        "messages.upsert", "chats.upsert", "contacts.upsert",  # first message: new chat, new contact
        "messages.upsert",  # same contact, same name: nothing more
        "messages.upsert",
        "messages.upsert", "chats.upsert", "contacts.upsert",  # group: the group chat, Mary
        "messages.delete",
        "messages.edited",
        "messages.update", "messages.update",
        "presence.update", "presence.update",
        "groups.upsert",
        "groups.update", "group-participants.update",
        "call",
    ]  # fmt: skip
    data = [event["data"] for event in got]
    assert data[0] == {
        "key": {"remoteJid": "5511999999999@s.whatsapp.net", "fromMe": False, "id": "3EB0AAAAAAAAAAAAAAAAAA"},
        "pushName": "John",
        "status": "DELIVERY_ACK",
        "message": {"conversation": "Hello"},  # no contextInfo: upstream's JSON leaves it out
        "messageType": "conversation",
        "messageTimestamp": 1700000000,
        "instanceId": instance_id,
        "source": "web",
    }
    assert data[1] == [
        {
            "remoteJid": "5511999999999@s.whatsapp.net",
            "instanceId": instance_id,
            "name": "John",
            "unreadMessages": 1,
        }
    ]
    assert data[2] == {
        "remoteJid": "5511999999999@s.whatsapp.net",
        "pushName": "John",
        "profilePicUrl": None,
        "instanceId": instance_id,
    }
    assert (data[4]["messageType"], data[4]["message"], data[4]["contextInfo"]) == (
        "conversation",  # upstream's prepareMessage: an extendedTextMessage's text is `conversation`
        {"conversation": "Re"},
        {"stanzaId": "3EB0AAAAAAAAAAAAAAAAAA", "participant": "5511999999999@s.whatsapp.net"},
    )
    assert data[5]["key"] == {
        "remoteJid": "120363000000000000@g.us",
        "fromMe": False,
        "id": "3A0000000000000000FF",
        "participant": "5511888888888@s.whatsapp.net",
    }
    assert data[5]["messageType"] == "imageMessage" and data[5]["source"] == "ios"
    assert data[5]["message"]["imageMessage"] == {
        "url": "https://mmg.whatsapp.net/x",
        "mimetype": "image/jpeg",
        "fileSha256": "AQ==",
    }
    assert data[7]["remoteJid"] == "5511888888888@s.whatsapp.net" and data[7]["pushName"] == "Mary"
    assert data[8] == {
        "remoteJid": "5511999999999@s.whatsapp.net",
        "fromMe": True,
        "id": "3EB0CCCC",
        "status": "DELETED",
    }
    assert data[9]["editedMessage"] == {"conversation": "fixed"} and data[9]["key"]["id"] == "3EB0DDDD"
    assert data[10] == {
        "keyId": "3EB0M1",
        "remoteJid": "5511999999999@s.whatsapp.net",
        "fromMe": True,
        "participant": None,
        "status": "READ",
        "instanceId": instance_id,
    }
    assert data[11]["keyId"] == "3EB0M2"
    assert data[12] == {
        "id": "5511999999999@s.whatsapp.net",
        "presences": {
            "5511999999999@s.whatsapp.net": {"lastKnownPresence": "available", "lastSeen": 1700000200}
        },
    }
    assert data[13] == {
        "id": "120363000000000000@g.us",
        "presences": {"5511888888888@s.whatsapp.net": {"lastKnownPresence": "recording"}},
    }
    assert data[14] == [
        {
            "id": "120363000000000000@g.us",
            "subject": "Team",
            "subjectOwner": None,
            "subjectTime": 1700000000,
            "size": 2,
            "creation": 1690000000,
            "owner": "5511900000000@s.whatsapp.net",
            "desc": "Weekly",
            "descId": None,
            "restrict": False,
            "announce": False,
            "participants": [
                {"id": "5511900000000@s.whatsapp.net", "admin": "superadmin"},
                {"id": "5511888888888@s.whatsapp.net", "admin": None},
            ],
        }
    ]
    assert data[15] == [{"id": "120363000000000000@g.us", "author": sender, "subject": "Team 2"}]
    assert data[16] == {
        "id": "120363000000000000@g.us",
        "author": sender,
        "participants": ["5511999999999@s.whatsapp.net"],
        "action": "add",
    }
    assert data[17] == {
        "id": "CALL1",
        "from": "5511999999999@s.whatsapp.net",
        "chatId": "5511999999999@s.whatsapp.net",
        "date": "2023-11-14T22:15:00.000Z",
        "isVideo": True,
        "isGroup": False,
        "status": "offer",
        "offline": False,
    }


async def test_one_broken_session_does_not_touch_another_or_the_router(
    core, receiver, make_settings, tmp_path
):
    session_instance(tmp_path, receiver, "bot")
    session_instance(tmp_path, receiver, "shop")
    write_instance(
        tmp_path / "instances", "plain", f"webhook: {{enabled: true, url: '{receiver.url}/plain'}}\n"
    )
    async with running(make_settings()) as app:
        await connect(core, BOT)
        await connect(core, b"shop")
        # bot: an event its mapping cannot take (a call dated past year 9999), then its client fails.
        bad = proto.CallOffer(
            basicCallMeta=proto.BasicCallMeta(timestamp=10**15, callID="X", **{"from": JOHN})
        )
        core.emit(BOT, bad)
        core.fail(BOT, "boom")
        # shop and the HTTP adapter go on.
        core.emit(b"shop", proto.Message(Info=info("3EB0SHOP"), Message=wa.Message(conversation="hi")))
        assert (await post_ingest(app, {"event": "call", "instance": "plain", "data": {}}))[0] == 202
        await receiver.wait_for(1, "/plain")
        shop = [e["event"] for e in await accepted_at(receiver, "/shop", 3)]
        assert shop == ["connection.update", "connection.update", "messages.upsert"]
        # bot was not ended by its unmappable event: it reconnects after its failure.
        await core.wait_connects(BOT, 2)
        core.emit(BOT, proto.Message(Info=info("3EB0BOT2"), Message=wa.Message(conversation="still here")))
        bot = await receiver.wait_for(1, "/bot")
        await wait_until(lambda: any(r.json()["event"] == "messages.upsert" for r in receiver.on("/bot")))
    assert not any(r.json()["event"] == "call" for r in bot)


def test_without_the_extra_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "neonize", None)  # what an environment without neonize imports
    monkeypatch.delitem(sys.modules, "router.adapters.whatsapp.session", raising=False)
    with pytest.raises(ConfigError) as refused:
        whatsapp.load()
    assert "pip install 'evolution-router[whatsapp]'" in refused.value.problems[0]

    instances = tmp_path / "instances"
    instances.mkdir()
    write_instance(instances, "bot", "integration: WHATSAPP-WHATSMEOW\n")
    block = "import sys; sys.modules['neonize'] = None; from router.cli import main;"
    run = "raise SystemExit(main(['--config', '/nonexistent', '--env-file', '/nonexistent', 'check']))"
    env = {"AUTHENTICATION_API_KEY": "k", "ROUTER_INSTANCES_DIR": str(instances), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-c", block + run], env=env, cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 1
    assert (
        "error: instances bot: integration WHATSAPP-WHATSMEOW needs the optional WhatsApp library:"
        in result.stderr
    )
    assert "pip install 'evolution-router[whatsapp]'" in result.stderr


async def test_without_the_extra_the_daemon_runs_the_other_instances(
    monkeypatch, receiver, make_settings, tmp_path, capsys
):
    monkeypatch.setitem(sys.modules, "neonize", None)
    monkeypatch.delitem(sys.modules, "router.adapters.whatsapp.session", raising=False)
    session_instance(tmp_path, receiver, "bot")
    write_instance(
        tmp_path / "instances", "plain", f"webhook: {{enabled: true, url: '{receiver.url}/plain'}}\n"
    )
    async with running(make_settings()) as app:
        assert (await post_ingest(app, {"event": "call", "instance": "plain", "data": {}}))[0] == 202
        await receiver.wait_for(1, "/plain")
    logged = capsys.readouterr()
    assert "whatsapp.unavailable" in logged.out + logged.err
    assert "pip install 'evolution-router[whatsapp]'" in logged.out + logged.err


async def test_messages_are_prepared_as_upstream_prepares_them(core, receiver, make_settings, tmp_path):
    """Upstream's prepareMessage, rule for rule: texts as `conversation`, captioned documents as
    `documentMessage` (in the message and in the one it quotes), and the pushName fallbacks."""
    session_instance(tmp_path, receiver)
    async with running(make_settings()) as app:
        await connect(core)
        start = len(await events_at(receiver, "/bot", 2))
        instance_id = app.instances["bot"].id
        document = wa.DocumentMessage(fileName="q3.pdf", mimetype="application/pdf", caption="Q3")
        captioned = wa.Message(
            documentWithCaptionMessage=wa.FutureProofMessage(message=wa.Message(documentMessage=document))
        )
        quoting = wa.ContextInfo(
            stanzaID="3EB0PPPPPPPPPPPPPPPPPP",
            participant="5511999999999@s.whatsapp.net",
            quotedMessage=wa.Message(extendedTextMessage=wa.ExtendedTextMessage(text="the link")),
        )
        reply = wa.Message(extendedTextMessage=wa.ExtendedTextMessage(text="seen", contextInfo=quoting))
        feed = [
            proto.Message(Info=info("3EB0D0C0D0C0D0C0D0C0D0", push=""), Message=captioned),
            proto.Message(
                Info=info("3EB0R0R0R0R0R0R0R0R0R0", from_me=True, sender=ME, push=""), Message=reply
            ),
            proto.Message(
                Info=info("3EB0G0G0G0G0G0G0G0G0G0", chat=GROUP, sender=MARY, group=True, push=""),
                Message=wa.Message(conversation="hi all"),
            ),
        ]
        for event in feed:
            core.emit(BOT, event)
        got = (await accepted_at(receiver, "/bot", start + 5))[start:]

    upserts = [event["data"] for event in got if event["event"] == "messages.upsert"]
    assert upserts[0] == {
        "key": {"remoteJid": "5511999999999@s.whatsapp.net", "fromMe": False, "id": "3EB0D0C0D0C0D0C0D0C0D0"},
        "pushName": None,  # received, not in a group, no name: upstream has nothing to fall back on
        "status": "DELIVERY_ACK",
        "message": {
            "documentMessage": {"mimetype": "application/pdf", "caption": "Q3", "fileName": "q3.pdf"}
        },
        "messageType": "documentMessage",
        "messageTimestamp": 1700000000,
        "instanceId": instance_id,
        "source": "web",
    }
    assert upserts[1]["pushName"] == "Você"  # upstream's name for one's own messages
    assert (upserts[1]["status"], upserts[1]["messageType"]) == ("SERVER_ACK", "conversation")
    assert upserts[1]["message"] == {"conversation": "seen"}
    assert upserts[1]["contextInfo"] == {
        "stanzaId": "3EB0PPPPPPPPPPPPPPPPPP",
        "participant": "5511999999999@s.whatsapp.net",
        "quotedMessage": {"conversation": "the link"},
    }
    assert upserts[2]["pushName"] == "5511888888888"  # a group member with no name: the number


async def test_create_with_qrcode_answers_the_first_qr_code(core, receiver, make_settings):
    """Upstream's create with `qrcode: true` connects and answers with the session's QR code."""
    body = {
        "instanceName": "fresh",
        "integration": "WHATSAPP-WHATSMEOW",
        "qrcode": True,
        "webhook": {"url": f"{receiver.url}/fresh", "events": ["QRCODE_UPDATED"]},
    }
    async with running(make_settings()) as app:
        creating = asyncio.create_task(admin(app, "POST", "/instance/create", body))
        await core.wait_connects(b"fresh", 1)
        core.qr(b"fresh", "2@first-code")
        status, answer = await creating
        [sent] = await receiver.wait_for(1, "/fresh")
    assert status == 201, answer
    assert answer["instance"]["status"] == "connecting"
    qrcode = answer["qrcode"]
    assert (qrcode["code"], qrcode["pairingCode"], qrcode["count"]) == ("2@first-code", None, 1)
    assert qrcode["base64"].startswith("data:image/png;base64,")
    assert sent.json()["data"]["qrcode"]["code"] == "2@first-code"


async def test_with_several_routers_a_session_runs_on_one_and_moves_when_it_stops(
    core, receiver, make_settings, tmp_path, pg_url
):
    """Two routers on one PostgreSQL database: the session runs on exactly one of them; when
    that router goes, the other takes the session over and its events flow again."""
    session_instance(tmp_path, receiver, "bot")
    (tmp_path / "instances-2").mkdir()
    first = make_settings(ROUTER_DATABASE_URL=pg_url, ROUTER_NODE_NAME="first")
    second = make_settings(
        ROUTER_DATABASE_URL=pg_url,
        ROUTER_NODE_NAME="second",
        ROUTER_INSTANCES_DIR=str(tmp_path / "instances-2"),
        ROUTER_STATE_DIR=str(tmp_path / "state-2"),
    )
    async with contextlib.AsyncExitStack() as first_running:
        app_first = await first_running.enter_async_context(running(first))
        await core.wait_connects(BOT, 1)  # the first router, alone, runs the session
        async with running(second) as app_second:
            assert "bot" in app_second.instances  # the instance came through the database
            ownership = app_second.whatsapp.ownership
            rounds = ownership.rounds
            await wait_until(lambda: ownership.rounds >= rounds + 2)  # it looked for it, twice
            assert core.connects[BOT] == 1 and not app_second.whatsapp.sessions
            assert "bot" in app_first.whatsapp.sessions
            # What the session keeps in its database file (neonize's, in the real library).
            with contextlib.closing(sqlite3.connect(tmp_path / "state" / "whatsapp" / "bot.db")) as db:
                db.execute("CREATE TABLE device (jid TEXT)")
                db.execute("INSERT INTO device VALUES ('5511999999999@s.whatsapp.net')")
                db.commit()
            await first_running.aclose()  # the first router stops: its lock goes with its connection
            await core.wait_connects(BOT, 2)  # the second router took the session over
            assert "bot" in app_second.whatsapp.sessions
            moved = tmp_path / "state-2" / "whatsapp" / "bot.db"  # the credentials came with it
            with contextlib.closing(sqlite3.connect(moved)) as db:
                assert db.execute("SELECT jid FROM device").fetchall() == [("5511999999999@s.whatsapp.net",)]
            await connect(core, BOT)
            message = proto.Message(Info=info("3EB0MOVED"), Message=wa.Message(conversation="moved"))
            core.emit(BOT, message)
            await wait_until(lambda: any("3EB0MOVED" in r.body.decode() for r in receiver.on("/bot")))
