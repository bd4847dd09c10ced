"""What the router has seen of each instance's WhatsApp connection, for the admin API.

Upstream answers ``fetchInstances`` and ``instance/create`` with the connection's state, the
account, and the QR code. The router learns them from the events it accepts, whichever adapter
brought them (stock Evolution API posting to ``/ingest``, or a session the router runs):
``connection.update``, ``qrcode.updated`` and ``logout.instance``. Kept in memory only: after a
restart an instance is ``close`` until its next ``connection.update``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from router.events import Event

WATCHED = frozenset({"connection.update", "qrcode.updated", "logout.instance"})


@dataclass
class Connection:
    """One instance's connection as upstream's Instance row reports it."""

    state: str = "close"  # upstream's connectionStatus: open, connecting or close
    owner_jid: str | None = None
    profile_name: str | None = None
    profile_pic_url: str | None = None
    disconnection_reason: int | None = None
    disconnection_at: str | None = None
    qrcode: dict[str, Any] | None = None  # upstream's qrCode: pairingCode, code, base64, count
    qr_seen: asyncio.Event = field(default_factory=asyncio.Event)


class InstanceStatus:
    """Fed by intake with every accepted event; read by the admin API."""

    def __init__(self) -> None:
        self._connections: dict[str, Connection] = {}

    def get(self, instance: str) -> Connection:
        return self._connections.get(instance) or Connection()

    def forget(self, instance: str) -> None:
        self._connections.pop(instance, None)

    def observe(self, events: Iterable[Event]) -> None:
        for event in events:
            if event.event in WATCHED:
                self._observe(event)

    def _observe(self, event: Event) -> None:
        try:
            data = orjson.loads(event.data)
        except orjson.JSONDecodeError:  # stored as it came; nothing to learn from it
            return
        data = data if isinstance(data, dict) else {}
        connection = self._connections.setdefault(event.instance, Connection())
        if event.event == "logout.instance":
            connection.state, connection.owner_jid = "close", None
            connection.disconnection_at = event.date_time
        elif event.event == "qrcode.updated":
            nested = data.get("qrcode")
            qrcode: dict[str, Any] = nested if isinstance(nested, dict) else data
            count = (connection.qrcode or {}).get("count", 0) + 1
            connection.qrcode = {
                "pairingCode": qrcode.get("pairingCode"),
                "code": qrcode.get("code"),
                "base64": qrcode.get("base64"),
                "count": count,
            }
            connection.qr_seen.set()
        elif isinstance(state := data.get("state"), str):
            connection.state = state
            if state == "open":
                connection.owner_jid = data.get("wuid") or connection.owner_jid
                connection.profile_name = data.get("profileName") or connection.profile_name
                connection.profile_pic_url = data.get("profilePictureUrl") or connection.profile_pic_url
                connection.qrcode = None
            elif state == "close":
                reason = data.get("statusReason")
                connection.disconnection_reason = reason if isinstance(reason, int) else None
                connection.disconnection_at = event.date_time

    async def wait_for_qrcode(self, instance: str, timeout_s: float) -> dict[str, Any] | None:
        """The instance's latest QR code, waiting up to ``timeout_s`` for a first one."""
        connection = self._connections.setdefault(instance, Connection())
        if connection.qrcode is None:
            try:
                await asyncio.wait_for(connection.qr_seen.wait(), timeout_s)
            except TimeoutError:
                return None
        return connection.qrcode
