"""neonize's events (protobuf messages from whatsmeow) -> our events, in upstream's data shapes.

Upstream (Evolution API on Baileys) sends Baileys' objects; this module builds the same shapes
from whatsmeow's. ``Mapper`` keeps the little state the mapping needs per session: the account's
own JID (the envelope's ``sender``) and the contacts and chats seen, for ``contacts.upsert`` and
``chats.upsert``. Every method returns ``[(wire name, data), ...]``.

Message contents are WhatsApp's protobuf as JSON, with whatsmeow's Go-style initialisms spelt as
Baileys spells them (``remoteJID`` -> ``remoteJid``, ``fileSHA256`` -> ``fileSha256``); 64-bit
integers inside them are strings, as protobuf's JSON mapping writes them.
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format

Out = list[tuple[str, Any]]
MAX_REMEMBERED = 50_000  # contacts or chats remembered per session; past it, forgotten and re-announced

# whatsmeow's receipt types -> (upstream's message status, is the receipt about my own message)
RECEIPT_STATUS = {
    "DELIVERED": ("DELIVERY_ACK", True),
    "READ": ("READ", True),
    "PLAYED": ("PLAYED", True),
    "READ_SELF": ("READ", False),
    "PLAYED_SELF": ("PLAYED", False),
    "SERVER_ERROR": ("ERROR", True),
}
PROTOCOL_REVOKE, PROTOCOL_EDIT = 0, 14  # waE2E.ProtocolMessage.Type
NOT_CONTENT = frozenset({"senderKeyDistributionMessage", "messageContextInfo"})
_INITIALISM = re.compile(r"[A-Z]{2,}(?=[A-Z][a-z]|[^A-Za-z]|$)")


@functools.lru_cache(maxsize=4096)
def baileys_name(name: str) -> str:
    """``remoteJID`` -> ``remoteJid``, ``ID`` -> ``id``, ``JPEGThumbnail`` -> ``jpegThumbnail``."""
    return _INITIALISM.sub(lambda m: m[0].lower() if m.start() == 0 else m[0][0] + m[0][1:].lower(), name)


def _rename(value: Any) -> Any:
    if isinstance(value, dict):
        return {baileys_name(key): _rename(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_rename(item) for item in value]
    return value


def as_json(message: Any) -> dict[str, Any]:
    """A protobuf message as upstream's JSON: camelCase names, Baileys' spelling."""
    return _rename(json_format.MessageToDict(message))  # type: ignore[no-any-return]


def jid(value: Any) -> str | None:
    """``user@server`` (no device), or None for an empty JID."""
    if value is None or not value.User or not value.Server:
        return None
    return f"{value.User}@{value.Server}"


def content_type(message: dict[str, Any]) -> str:
    """Baileys' ``getContentType``: the first field that is the content itself."""
    for key in message:
        if key not in NOT_CONTENT and (key == "conversation" or key.endswith("Message")):
            return key
    return "unknown"


def device_of(message_id: str) -> str:
    """Baileys' ``getDevice``: which kind of device made a message id."""
    if re.fullmatch(r"3A.{18}", message_id):
        return "ios"
    if re.fullmatch(r"3E.{20}", message_id):
        return "web"
    if re.fullmatch(r".{21}|.{32}", message_id):
        return "android"
    if re.match(r"3F|.{18}$", message_id):
        return "desktop"
    return "unknown"


def group_metadata(info: Any) -> dict[str, Any]:
    """whatsmeow's GroupInfo as Baileys' GroupMetadata."""
    return {
        "id": jid(info.JID),
        "subject": info.GroupName.Name,
        "subjectOwner": jid(info.GroupName.NameSetBy),
        "subjectTime": info.GroupName.NameSetAt or None,
        "size": len(info.Participants),
        "creation": int(info.GroupCreated) or None,
        "owner": jid(info.OwnerJID),
        "desc": info.GroupTopic.Topic or None,
        "descId": info.GroupTopic.TopicID or None,
        "restrict": info.GroupLocked.isLocked,
        "announce": info.GroupAnnounce.IsAnnounce,
        "participants": [
            {
                "id": jid(member.JID),
                "admin": "superadmin" if member.IsSuperAdmin else "admin" if member.IsAdmin else None,
            }
            for member in info.Participants
        ],
    }


def _plain_text_and_documents(message: dict[str, Any], kind: str) -> tuple[dict[str, Any], str]:
    """Upstream's two rewrites of a message (a copy) and of its type: the text of an
    ``extendedTextMessage`` as ``conversation``; a ``documentWithCaptionMessage``'s document as
    ``documentMessage``."""
    message = dict(message)
    extended = message.get("extendedTextMessage")
    if isinstance(extended, dict):
        kind = "conversation"
        message["conversation"] = extended.get("text")
        del message["extendedTextMessage"]
    wrapped = message.get("documentWithCaptionMessage")
    if isinstance(wrapped, dict):
        kind = "documentMessage"
        message["documentMessage"] = (wrapped.get("message") or {}).get("documentMessage")
        del message["documentWithCaptionMessage"]
    return message, kind


class Mapper:
    def __init__(self, instance: str, instance_id: str) -> None:
        self.instance = instance
        self.instance_id = instance_id
        self.own_jid: str | None = None
        self.profile_name: str | None = None
        self._contacts: dict[str, str] = {}  # jid -> push name last announced
        self._chats: set[str] = set()

    # --- connection ----------------------------------------------------------------------

    def connection(self, state: str, status_reason: int) -> Out:
        data: dict[str, Any] = {"instance": self.instance}
        if state == "open":
            data |= {"wuid": self.own_jid, "profileName": self.profile_name, "profilePictureUrl": None}
        return [("connection.update", data | {"state": state, "statusReason": status_reason})]

    def qrcode(self, code: str, base64_png: str, pairing_code: str | None) -> Out:
        qrcode = {"instance": self.instance, "pairingCode": pairing_code, "code": code, "base64": base64_png}
        return [("qrcode.updated", {"qrcode": qrcode})]

    # --- messages ------------------------------------------------------------------------

    def message(self, event: Any) -> Out:
        info, source = event.Info, event.Info.MessageSource
        chat, from_me = jid(source.Chat), source.IsFromMe
        content = as_json(event.Message)
        protocol = event.Message.protocolMessage if event.Message.HasField("protocolMessage") else None
        if protocol is not None and protocol.HasField("type"):
            if protocol.type == PROTOCOL_REVOKE:
                target = protocol.key
                revoked = {"remoteJid": target.remoteJID or chat, "fromMe": target.fromMe, "id": target.ID}
                if target.participant:
                    revoked["participant"] = target.participant
                return [("messages.delete", revoked | {"status": "DELETED"})]
            if protocol.type == PROTOCOL_EDIT:
                return [("messages.edited", content["protocolMessage"])]
            return []  # history sync notices, key shares ...: the session's business, not events
        key: dict[str, Any] = {"remoteJid": chat, "fromMe": from_me, "id": info.ID}
        if source.IsGroup:
            key["participant"] = jid(source.Sender)
        out: Out = [("messages.upsert", self.prepare_message(key, info.Pushname, content, info.Timestamp))]
        if chat is not None and chat not in self._chats:
            self._remember(self._chats, chat)
            name = info.Pushname if not (from_me or source.IsGroup) else None
            chat_row = {"remoteJid": chat, "instanceId": self.instance_id, "name": name or None}
            out.append(("chats.upsert", [chat_row | {"unreadMessages": 0 if from_me else 1}]))
        sender = jid(source.Sender) if source.IsGroup else chat
        if not from_me and sender is not None and info.Pushname:
            out += self._contact(sender, info.Pushname)
        return out

    def prepare_message(
        self, key: dict[str, Any], push_name: str, content: dict[str, Any], timestamp: int
    ) -> dict[str, Any]:
        """Upstream's ``prepareMessage`` (whatsapp.baileys.service.ts), rule for rule.

        ``pushName`` falls back to "Você" for one's own messages and to the sender's number in a
        group; a received message is ``DELIVERY_ACK``; ``extendedTextMessage`` becomes
        ``conversation`` (its text) and ``documentWithCaptionMessage`` its ``documentMessage``,
        in the message and in the message it quotes; ``contextInfo`` is the content's own, and
        left out when it has none, as upstream's JSON leaves ``undefined`` out.
        """
        from_me = key["fromMe"]
        participant = key.get("participant")
        fallback = "Você" if from_me else participant.split("@")[0] if participant else None
        kind = content_type(content)
        body = content.get(kind)
        context = body.get("contextInfo") if isinstance(body, dict) else None
        message, kind = _plain_text_and_documents(content, kind)
        data: dict[str, Any] = {
            "key": key,
            "pushName": push_name or fallback,
            "status": "SERVER_ACK" if from_me else "DELIVERY_ACK",
            "message": message,
        }
        if context is not None:
            quoted = context.get("quotedMessage")
            if isinstance(quoted, dict):
                context = {**context, "quotedMessage": _plain_text_and_documents(quoted, "")[0]}
            data["contextInfo"] = context
        return data | {
            "messageType": kind,
            "messageTimestamp": timestamp,
            "instanceId": self.instance_id,
            "source": device_of(key["id"]),
        }

    def _contact(self, contact: str, push_name: str) -> Out:
        known = self._contacts.get(contact)
        if known == push_name:
            return []
        self._remember(self._contacts, contact, push_name)
        row = {
            "remoteJid": contact,
            "pushName": push_name,
            "profilePicUrl": None,
            "instanceId": self.instance_id,
        }
        return [("contacts.upsert" if known is None else "contacts.update", row)]

    @staticmethod
    def _remember(seen: dict[str, str] | set[str], key: str, value: str = "") -> None:
        if len(seen) >= MAX_REMEMBERED:
            seen.clear()
        if isinstance(seen, dict):
            seen[key] = value
        else:
            seen.add(key)

    def receipt(self, event: Any) -> Out:
        kind = type(event).ReceiptType.Name(event.Type) if event.HasField("Type") else "DELIVERED"
        if kind not in RECEIPT_STATUS:
            return []  # retries, peer and history-sync receipts are not message statuses
        status, from_me = RECEIPT_STATUS[kind]
        source = event.MessageSource
        participant = jid(source.Sender) if source.IsGroup else None
        return [
            (
                "messages.update",
                {
                    "keyId": message_id,
                    "remoteJid": jid(source.Chat),
                    "fromMe": from_me,
                    "participant": participant,
                    "status": status,
                    "instanceId": self.instance_id,
                },
            )
            for message_id in event.MessageIDs
        ]

    # --- presence ------------------------------------------------------------------------

    def presence(self, event: Any) -> Out:
        who = jid(event.From)
        presence: dict[str, Any] = {"lastKnownPresence": "unavailable" if event.Unavailable else "available"}
        if event.LastSeen:
            presence["lastSeen"] = event.LastSeen
        return [("presence.update", {"id": who, "presences": {who: presence}})]

    def chat_presence(self, event: Any) -> Out:
        cls = type(event)
        composing = event.State == cls.ChatPresence.Value("COMPOSING")
        recording = composing and event.Media == cls.ChatPresenceMedia.Value("AUDIO")
        state = "recording" if recording else "composing" if composing else "paused"
        source = event.MessageSource
        presences = {jid(source.Sender): {"lastKnownPresence": state}}
        return [("presence.update", {"id": jid(source.Chat), "presences": presences})]

    # --- groups --------------------------------------------------------------------------

    def joined_group(self, event: Any) -> Out:
        return [("groups.upsert", [group_metadata(event.GroupInfo)])]

    def group_info(self, event: Any) -> Out:
        group, author = jid(event.JID), jid(event.Sender)
        out: Out = []
        changes: dict[str, Any] = {}
        if event.HasField("Name"):
            changes["subject"] = event.Name.Name
        if event.HasField("Topic"):
            changes["desc"] = None if event.Topic.TopicDeleted else event.Topic.Topic
        if event.HasField("Locked"):
            changes["restrict"] = event.Locked.isLocked
        if event.HasField("Announce"):
            changes["announce"] = event.Announce.IsAnnounce
        if changes:
            out.append(("groups.update", [{"id": group, "author": author, **changes}]))
        for action, members in (
            ("add", event.Join),
            ("remove", event.Leave),
            ("promote", event.Promote),
            ("demote", event.Demote),
        ):
            if members:
                participants = [jid(member) for member in members]
                data = {"id": group, "author": author, "participants": participants, "action": action}
                out.append(("group-participants.update", data))
        return out

    # --- calls ---------------------------------------------------------------------------

    def call(self, event: Any, status: str) -> Out:
        meta = event.basicCallMeta
        caller = jid(getattr(meta, "from"))  # a Python keyword as a field name
        when = datetime.fromtimestamp(meta.timestamp, UTC) if meta.timestamp else datetime.now(UTC)
        video = any(node.Tag == "video" for node in event.data.Nodes) if event.HasField("data") else False
        data = {
            "id": meta.callID,
            "from": caller,
            "chatId": caller,
            "date": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "isVideo": video,
            "isGroup": False,
            "status": status,
            "offline": False,
        }
        return [("call", data)]
