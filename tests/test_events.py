"""Event names, ids, timestamps and the envelope's shape."""

from __future__ import annotations

import re
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from router.events import (
    WIRE_NAMES,
    Event,
    UnknownEventError,
    by_events_suffix,
    config_name,
    envelope,
    new_event_id,
    normalise_timestamp,
    utc_timestamp,
    wire_from_suffix,
    wire_name,
)

SPEC_TABLE = {
    "APPLICATION_STARTUP": "application.startup",
    "INSTANCE_CREATE": "instance.create",
    "INSTANCE_DELETE": "instance.delete",
    "QRCODE_UPDATED": "qrcode.updated",
    "CONNECTION_UPDATE": "connection.update",
    "STATUS_INSTANCE": "status.instance",
    "REMOVE_INSTANCE": "remove.instance",
    "LOGOUT_INSTANCE": "logout.instance",
    "MESSAGES_SET": "messages.set",
    "MESSAGES_UPSERT": "messages.upsert",
    "MESSAGES_EDITED": "messages.edited",
    "MESSAGES_UPDATE": "messages.update",
    "MESSAGES_DELETE": "messages.delete",
    "SEND_MESSAGE": "send.message",
    "SEND_MESSAGE_UPDATE": "send.message.update",
    "PRESENCE_UPDATE": "presence.update",
    "CHATS_SET": "chats.set",
    "CHATS_UPSERT": "chats.upsert",
    "CHATS_UPDATE": "chats.update",
    "CHATS_DELETE": "chats.delete",
    "GROUPS_UPSERT": "groups.upsert",
    "GROUPS_UPDATE": "groups.update",
    "GROUP_PARTICIPANTS_UPDATE": "group-participants.update",
    "CALL": "call",
    "LABELS_EDIT": "labels.edit",
    "LABELS_ASSOCIATION": "labels.association",
    "TYPEBOT_START": "typebot.start",
    "TYPEBOT_CHANGE_STATUS": "typebot.change-status",
    "CONTACTS_SET": "contacts.set",
    "CONTACTS_UPSERT": "contacts.upsert",
    "CONTACTS_UPDATE": "contacts.update",
}


def test_all_31_events_map_as_the_spec_says():
    assert len(WIRE_NAMES) == 31
    assert {config_name(w): w for w in WIRE_NAMES} == SPEC_TABLE
    for config, wire in SPEC_TABLE.items():
        assert wire_name(config) == wire == wire_name(wire)
        assert by_events_suffix(wire) == "/" + config.lower().replace("_", "-")
        assert wire_from_suffix(by_events_suffix(wire)) == wire
    assert by_events_suffix("group-participants.update") == "/group-participants-update"
    assert wire_name("GROUP_UPDATE") == "groups.update"


def test_unknown_names_raise_naming_them():
    with pytest.raises(UnknownEventError, match="'MESSAGE_UPSERT'"):
        wire_name("MESSAGE_UPSERT")
    with pytest.raises(UnknownEventError, match="'messages-explode'"):
        wire_from_suffix("messages-explode")


def test_ids_are_unique_and_time_ordered():
    ids = [new_event_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(
        re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", i)
        for i in ids[:50]
    )
    before_ms = time.time_ns() // 1_000_000
    made = uuid.UUID(new_event_id())
    assert made.version == 7 and made.variant == uuid.RFC_4122
    assert before_ms <= made.int >> 80 <= time.time_ns() // 1_000_000 + 1  # its time is now, in ms


def test_timestamps_are_true_utc_with_milliseconds():
    moment = datetime(2023, 12, 1, 7, 30, 0, 123456, tzinfo=timezone(timedelta(hours=-3)))
    assert utc_timestamp(moment) == "2023-12-01T10:30:00.123Z"
    assert normalise_timestamp("2023-12-01T07:30:00-03:00") == "2023-12-01T10:30:00.000Z"
    assert normalise_timestamp("2023-12-01T10:30:00Z") == "2023-12-01T10:30:00.000Z"
    now = datetime.now(UTC)
    parsed = datetime.fromisoformat(utc_timestamp().replace("Z", "+00:00"))
    assert abs((parsed - now).total_seconds()) < 5


def test_envelope_key_order_and_optional_fields():
    event = Event(id="e1", instance="i", event="call", data=b'{"a":1}', date_time="2023-12-01T10:30:00.000Z")
    body = orjson.loads(envelope(event, destination="http://x", apikey=None))
    assert list(body) == ["event", "instance", "data", "destination", "date_time", "apikey", "id"]
    full = Event(id="e1", instance="i", event="call", data=b"[]", date_time="t", sender="s")
    body = orjson.loads(
        envelope(
            full, server_url="http://gw", apikey="tok", extra={"dataType": "json", "server": "evolution"}
        )
    )
    assert list(body) == [
        "event",
        "instance",
        "data",
        "date_time",
        "sender",
        "server_url",
        "apikey",
        "dataType",
        "server",
        "id",
    ]
