"""Ordering keys: which deliveries of a target must go one at a time, in acceptance order.

Every event names the conversation it belongs to (its *chat*: ``data.key.remoteJid``, or the
chat, contact or group id the event carries), or none (connection, QR code, call and instance
lifecycle events concern the whole instance). Each sink kind orders its deliveries by one of:

- ``chat``: one key per instance and chat; an event without a chat uses the instance's key;
- ``instance``: one key per instance;
- ``none``: no key; every delivery may overtake every other (all slots in use).

Deliveries of one target that share a key are attempted one at a time, oldest first; a retry
holds back the later deliveries of its key until it succeeds or becomes a dead letter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

Mode = Literal["chat", "instance", "none"]
MODES: tuple[Mode, ...] = ("chat", "instance", "none")

# Events about the instance as a whole: never one chat's, whatever their data holds.
INSTANCE_EVENTS = frozenset(
    {
        "application.startup",
        "instance.create",
        "instance.delete",
        "qrcode.updated",
        "connection.update",
        "status.instance",
        "remove.instance",
        "logout.instance",
        "messages.set",
        "chats.set",
        "contacts.set",
        "call",
        "labels.edit",
        "typebot.start",
        "typebot.change-status",
    }
)
_CHAT_FIELDS = ("remoteJid", "chatId", "id")  # where events other than messages name their chat
MAX_CHAT_LENGTH = 256  # longer is not a WhatsApp id: such events are ordered by instance


def chat_of(wire: str, data: Any) -> str | None:
    """The chat ``data`` of a ``wire`` event belongs to, or None (the instance as a whole).

    Messages name it in ``key.remoteJid`` (``messages.update``: ``remoteJid``); chats, contacts
    and groups in ``remoteJid``, ``chatId`` or ``id``; a list (``chats.upsert``, or the ids of
    ``chats.delete``) by its first item.
    """
    if wire in INSTANCE_EVENTS:
        return None
    if isinstance(data, list):
        data = data[0] if data else None
        if isinstance(data, str):  # a list of ids (``chats.delete``)
            return data if 0 < len(data) <= MAX_CHAT_LENGTH else None
    if not isinstance(data, dict):
        return None
    key = data.get("key")
    if isinstance(key, dict):
        chat = key.get("remoteJid")
        if isinstance(chat, str) and 0 < len(chat) <= MAX_CHAT_LENGTH:
            return chat
    for field in _CHAT_FIELDS:
        chat = data.get(field)
        if isinstance(chat, str) and 0 < len(chat) <= MAX_CHAT_LENGTH:
            return chat
    return None


def ordering_key(mode: str, instance: str, chat: str | None) -> str | None:
    """The key deliveries under ``mode`` share; None when they share none."""
    if mode == "none":
        return None
    if mode == "instance" or chat is None:
        return instance
    return f"{instance}\n{chat}"  # a newline is in no instance name


class Ordering:
    """The ordering mode of every target, by the sink kind its key starts with."""

    def __init__(self, modes: Mapping[str, str]) -> None:
        self._modes = dict(modes)  # sink name -> mode
        self._by_target: dict[str, str] = {}

    def mode(self, target: str) -> str:
        mode = self._by_target.get(target)
        if mode is None:
            mode = self._modes.get(target.split(":", 1)[0], "none")
            if len(self._by_target) < 1_000_000:  # a cache, bounded whatever the target count
                self._by_target[target] = mode
        return mode

    def keys(self, targets: tuple[str, ...], instance: str, chat: str | None) -> tuple[str | None, ...]:
        """The ordering key of one event's delivery to each of ``targets``."""
        if len(targets) == 1:  # most events: no generator for one key
            return (ordering_key(self.mode(targets[0]), instance, chat),)
        return tuple(ordering_key(self.mode(target), instance, chat) for target in targets)
