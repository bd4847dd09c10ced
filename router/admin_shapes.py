"""Upstream's request bodies and answers for the admin API, as plain data in and out.

Requests: ``instance/create`` takes upstream's nested sink objects (``webhook: {...}``) and the
flat keys of its ``instance.schema.ts`` (``webhookUrl``, ``rabbitmqEnabled`` ...); ``set`` takes a
sink object whose keys may be camelCase or snake_case (``webhook_by_events``). Both become the
instance file's shape here. Keys upstream's schemas accept but the router does not use are kept
in the file; any other key is dropped and named, so the caller can warn once, never refuse.

Answers: the rows and objects upstream's controllers return (``fetchInstances``' Instance rows
with their sink rows, ``Setting`` and ``_count``; a sink's row for ``find`` and ``set``).
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel

from router.events import STARTUP, config_name
from router.instance_status import Connection
from router.instances import UPSTREAM_KEYS, InstanceConfig, accepted_keys
from router.sections import Subscription
from router.sinks.registry import SECTIONS

# The sections a request may set: every sink's, and the live streams'. Kafka's (upstream's,
# with no sink here) is accepted and kept in the file.
SECTION_MODELS: dict[str, type[BaseModel]] = {
    **{name: kind.section for name, kind in SECTIONS.items() if kind.section is not None},
    "websocket": Subscription,
    "kafka": Subscription,
}
SINKS = (*SECTIONS, "websocket")  # the /{sink}/set and /{sink}/find routes
TOP_LEVEL_KEYS = accepted_keys(InstanceConfig) | UPSTREAM_KEYS | {"instanceName", "instanceId"}
# instance.schema.ts' flat keys -> (section, key in it). Upstream's API names its own sinks; this
# is its schema, read once, not a list of ours (a sink added here gets no flat keys upstream lacks).
FLAT_KEYS: dict[str, tuple[str, str]] = {
    "webhookUrl": ("webhook", "url"),
    "webhookByEvents": ("webhook", "byEvents"),
    "webhookBase64": ("webhook", "base64"),
    "webhookEvents": ("webhook", "events"),
    "webhookHeaders": ("webhook", "headers"),
    "webhookEnabled": ("webhook", "enabled"),
    "rabbitmqEnabled": ("rabbitmq", "enabled"),
    "rabbitmqEvents": ("rabbitmq", "events"),
    "sqsEnabled": ("sqs", "enabled"),
    "sqsEvents": ("sqs", "events"),
    "natsEnabled": ("nats", "enabled"),
    "natsEvents": ("nats", "events"),
    "websocketEnabled": ("websocket", "enabled"),
    "websocketEvents": ("websocket", "events"),
}
# Upstream's EventController.events: its order and spelling (GROUP_UPDATE), which it stores for
# `events: []`. The router answers that list without APPLICATION_STARTUP, which "all" leaves out.
UPSTREAM_EVENTS = (
    "APPLICATION_STARTUP",
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
)
EVERY_EVENT_ROW = [name for name in UPSTREAM_EVENTS if name != config_name(STARTUP)]
# Upstream's per-instance settings, as its create answer and fetchInstances report them.
SETTING_DEFAULTS: dict[str, Any] = {
    "rejectCall": False,
    "msgCall": "",
    "groupsIgnore": False,
    "alwaysOnline": False,
    "readMessages": False,
    "readStatus": False,
    "syncFullHistory": False,
    "wavoipToken": "",
}


def too_deep(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists and objects more than ``limit`` levels (no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, dict | list):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _section(sink: str, given: dict[str, Any], ignored: list[str], where: str) -> dict[str, Any]:
    known = accepted_keys(SECTION_MODELS[sink])
    ignored += [f"{where}.{key}" for key in given if key not in known]
    return {key: value for key, value in given.items() if key in known}


def section_from_body(sink: str, given: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A ``set`` body's sink object -> the file's section; the keys dropped."""
    ignored: list[str] = []
    return _section(sink, given, ignored, sink), ignored


def file_from_create(body: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``instance/create``'s body -> the instance file's data (without id and token); the keys dropped.

    A sink given at create, nested or by flat keys, is enabled unless it says ``enabled: false``.
    """
    ignored: list[str] = []
    data: dict[str, Any] = {}
    flat: dict[str, dict[str, Any]] = {}
    for key, value in body.items():
        if key in FLAT_KEYS:
            section, name = FLAT_KEYS[key]
            flat.setdefault(section, {})[name] = value
        elif key in SECTION_MODELS:
            if isinstance(value, dict):
                data[key] = _section(key, value, ignored, key)
            elif value is not None:
                data[key] = value  # not an object: validation names it
        elif key in TOP_LEVEL_KEYS:
            data[key] = value
        else:
            ignored.append(key)
    for section, values in flat.items():
        data[section] = {**values, **data.get(section, {})}  # the nested object wins
    for section in SECTION_MODELS:
        if isinstance(data.get(section), dict):
            data[section].setdefault("enabled", True)
    return data, ignored


def event_names(section: Subscription) -> list[str]:
    """The events of a sink's row: as upstream spells them; ``[]`` (all) as upstream's full list."""
    if not section.enabled:
        return []
    if not section.events:
        return list(EVERY_EVENT_ROW)
    return ["GROUP_UPDATE" if wire == "groups.update" else config_name(wire) for wire in section.events]


def sink_row(config: InstanceConfig, sink: str) -> dict[str, Any] | None:
    """A sink section as upstream's database row; None where the instance has no such section."""
    section: Subscription | None
    if sink == "websocket":
        section = config.websocket if "websocket" in config.model_fields_set else None
    elif sink in SECTIONS:
        section = config.sections.get(sink)
    else:  # kept as upstream sent it (kafka)
        raw = (config.model_extra or {}).get(sink)
        section = Subscription.model_validate(raw) if isinstance(raw, dict) else None
    if section is None:
        return None
    row: dict[str, Any] = {
        "id": str(uuid.uuid5(uuid.UUID(config.id), sink)),
        "enabled": section.enabled,
        "events": event_names(section),
    }
    if sink in SECTIONS:
        row |= SECTIONS[sink].row(section)
    row["instanceId"] = config.id
    return row


def settings_of(config: InstanceConfig) -> dict[str, Any]:
    extra = config.model_extra or {}
    return {key: extra.get(key, default) for key, default in SETTING_DEFAULTS.items()}


def instance_row(config: InstanceConfig, connection: Connection, updated_at: str | None) -> dict[str, Any]:
    """One entry of ``fetchInstances``: upstream's Instance row with the rows it includes."""
    extra = config.model_extra or {}
    row = {
        "id": config.id,
        "name": config.instance_name,
        "connectionStatus": connection.state,
        "ownerJid": connection.owner_jid,
        "profileName": connection.profile_name,
        "profilePicUrl": connection.profile_pic_url,
        "integration": config.integration,
        "number": extra.get("number"),
        "businessId": extra.get("businessId"),
        "token": config.token,
        "clientName": None,
        "disconnectionReasonCode": connection.disconnection_reason,
        "disconnectionObject": None,
        "disconnectionAt": connection.disconnection_at,
        "createdAt": None,
        "updatedAt": updated_at,
        "Chatwoot": None,
        "Proxy": None,
    }
    for sink in SINKS:
        row[sink.capitalize()] = sink_row(config, sink)
    row["Setting"] = {
        "id": str(uuid.uuid5(uuid.UUID(config.id), "setting")),
        **settings_of(config),
        "instanceId": config.id,
    }
    row["_count"] = {"Message": 0, "Contact": 0, "Chat": 0}
    return row


def create_answer(
    config: InstanceConfig, state: str, qrcode: dict[str, Any] | None, qrcode_asked: bool
) -> dict[str, Any]:
    """``instance/create``'s answer, as upstream's controller builds it."""
    hook = config.section("webhook")
    answer: dict[str, Any] = {
        "instance": {
            "instanceName": config.instance_name,
            "instanceId": config.id,
            "integration": config.integration,
            "webhookWaBusiness": None,
            "accessTokenWaBusiness": "",
            "status": state,
        },
        "hash": config.token,
        "webhook": {
            "webhookUrl": getattr(hook, "url", None),
            "webhookHeaders": getattr(hook, "headers", None) or None,
            "webhookByEvents": getattr(hook, "by_events", False),
            "webhookBase64": getattr(hook, "base64", False),
        },
    }
    for sink in SINKS:
        if sink != "webhook":
            row = sink_row(config, sink)
            answer[sink] = {"enabled": row["enabled"] if row is not None else False}
    answer["settings"] = settings_of(config)
    if qrcode_asked:
        answer["qrcode"] = qrcode
    return answer
