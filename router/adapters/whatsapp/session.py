"""One live WhatsApp session: a neonize client for one instance, and its supervision.

``run`` connects and stays until ``stop`` or a logout. whatsmeow reconnects dropped connections by
itself; when the whole client ends with an error, ``run`` connects again after a growing pause
(1 s, doubling, at most ``MAX_RETRY_DELAY_S``). A logout, a temporary ban or an outdated client
ends the session for good: reconnecting cannot help, the instance has to be paired again.

neonize calls our handlers on the event loop (it hands them over from its Go threads); each one
maps the event and passes the results to ``emit`` at once, in the order the events came.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import neonize.aioze.events as neonize_events
import segno
from neonize.aioze.client import NewAClient
from neonize.events import EVENT_TO_INT
from neonize.exc import PairPhoneError
from neonize.proto import Neonize_pb2 as events

from router import logs
from router.adapters.whatsapp.mapping import Mapper, Out, jid
from router.instances import InstanceConfig

log = logs.get_logger("router.whatsapp")
# neonize warns at every start that ffmpeg is missing: it needs it to convert media it sends; the
# router sends nothing, so that warning is noise in the operator's log.
logging.getLogger("neonize.utils.ffmpeg").setLevel(logging.ERROR)
MAX_RETRY_DELAY_S = 60.0
# Upstream's statusReason values (Baileys' DisconnectReason), so consumers read them as before.
OPEN, CONNECTION_CLOSED, LOGGED_OUT, FORBIDDEN, REPLACED, OUTDATED = 200, 428, 401, 403, 440, 405

Emit = Callable[[str, str, Any, str | None], None]  # (instance, wire name, data, sender)


class Session:
    def __init__(self, config: InstanceConfig, database: Path, emit: Emit) -> None:
        self.instance = config.instance_name
        self.number: str | None = (config.model_extra or {}).get("number")  # pair by phone number
        self.database = database
        self._emit = emit
        self.mapper = Mapper(self.instance, config.id)
        self.state = "close"
        self.client: Any = None
        self._stopping = False
        self._ended = False  # logged out, banned or outdated: no reconnecting
        self._stopped = asyncio.Event()
        self._pairing_requested = False
        self._qr_lock = asyncio.Lock()  # QR codes go out in order, a pairing request among them

    def emit(self, out: Out) -> None:
        for wire, data in out:
            self._emit(self.instance, wire, data, self.mapper.own_jid)

    def _set_state(self, state: str, reason: int) -> None:
        self.state = state
        self.emit(self.mapper.connection(state, reason))
        log.info("whatsapp.connection", instance=self.instance, state=state, status_reason=reason)

    async def run(self) -> None:
        self.client = self._client()  # one client for the session's life: see _client
        try:
            await self._connect_until_done()
        finally:  # however it ended, the Go side's session ends with it
            await self._end_client()
        if self.state != "close":
            self._set_state("close", CONNECTION_CLOSED)

    async def _connect_until_done(self) -> None:
        delay = 1.0
        while not (self._stopping or self._ended):
            self._pairing_requested = False
            self._set_state("connecting", OPEN)
            error = None
            try:
                await (await self.client.connect())  # returns when the client ends
            except Exception as exc:  # the library's or the Go side's failure: reconnect
                error = f"{type(exc).__name__}: {exc}"
            if self._stopping or self._ended:
                return
            log.warning("whatsapp.session_ended", instance=self.instance, error=error, retry_in_s=delay)
            if self.state != "close":  # a replaced stream has said so already
                self._set_state("close", CONNECTION_CLOSED)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), delay)
            delay = min(delay * 2, MAX_RETRY_DELAY_S)

    async def stop(self) -> None:
        """End the session (the credentials stay: the next start resumes it)."""
        self._stopping = True
        self._stopped.set()
        await self._end_client()

    async def _end_client(self) -> None:
        if self.client is not None:
            await self.client.stop()

    # --- the client and its handlers -----------------------------------------------------

    def _client(self) -> Any:
        # neonize dispatches to the first event loop it saw, process-wide; this one is ours.
        neonize_events.event_global_loop = asyncio.get_running_loop()
        self.database.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        client = NewAClient(str(self.database), uuid=self.instance)
        # neonize stops a client's session (by uuid: the instance name) when the client object is
        # collected. A later session of the same instance has the same uuid, so a collected old
        # client would stop it. Sessions always stop their client themselves: no collect-time stop.
        finalizer = getattr(client, "_stop_finalizer", None)
        if finalizer is not None:
            finalizer.detach()
        client.event.qr(self._on_qr)
        handlers = {
            events.Connected: self._on_connected,
            events.PairStatus: self._on_pair_status,
            events.Disconnected: self._on_disconnected,
            events.LoggedOut: self._on_logged_out,
            events.TemporaryBan: self._on_banned,
            events.ClientOutdated: self._on_outdated,
            events.StreamReplaced: self._on_replaced,
            events.Message: self._mapped(self.mapper.message),
            events.Receipt: self._mapped(self.mapper.receipt),
            events.Presence: self._mapped(self.mapper.presence),
            events.ChatPresence: self._mapped(self.mapper.chat_presence),
            events.JoinedGroup: self._mapped(self.mapper.joined_group),
            events.GroupInfoEvent: self._mapped(self.mapper.group_info),
            events.CallOffer: self._mapped(lambda event: self.mapper.call(event, "offer")),
            events.CallAccept: self._mapped(lambda event: self.mapper.call(event, "accept")),
            events.CallTerminate: self._mapped(lambda event: self.mapper.call(event, "terminate")),
        }
        for event_type, handler in handlers.items():
            assert event_type in EVENT_TO_INT, event_type
            client.event(event_type)(handler)
        return client

    def _mapped(self, mapping: Callable[[Any], Out]) -> Callable[[Any, Any], Any]:
        async def handle(_: Any, event: Any) -> None:
            try:
                out = mapping(event)
            except Exception:  # one odd event must not end the session
                log.exception("whatsapp.unmappable", instance=self.instance, kind=type(event).__name__)
                return
            self.emit(out)

        return handle

    async def _on_qr(self, client: Any, code: bytes) -> None:
        async with self._qr_lock:
            text = code.decode()
            pairing_code = None
            if self.number and not self._pairing_requested:
                self._pairing_requested = True  # one code per connection; WhatsApp rejects repeats
                try:
                    pairing_code = await client.PairPhone(self.number, True)
                except PairPhoneError as exc:
                    log.error("whatsapp.pairing_failed", instance=self.instance, error=str(exc))
            png = segno.make_qr(text, error="h").png_data_uri(scale=4, border=3)
            self.emit(self.mapper.qrcode(text, png, pairing_code))

    def _remember_me(self, client: Any) -> None:
        me = getattr(client, "me", None)  # the Device event neonize keeps
        if me is not None and jid(me.JID) is not None:
            self.mapper.own_jid = jid(me.JID)
            self.mapper.profile_name = me.PushName or self.mapper.profile_name

    async def _on_pair_status(self, client: Any, event: Any) -> None:
        self.mapper.own_jid = jid(event.ID) or self.mapper.own_jid
        if event.Error:
            log.error("whatsapp.pairing_failed", instance=self.instance, error=event.Error)

    async def _on_connected(self, client: Any, _: Any) -> None:
        self._remember_me(client)
        self._set_state("open", OPEN)

    async def _on_disconnected(self, _: Any, __: Any) -> None:
        if not (self._stopping or self._ended):  # whatsmeow reconnects by itself
            self._set_state("connecting", CONNECTION_CLOSED)

    async def _on_replaced(self, _: Any, __: Any) -> None:
        # Another client took the session over; upstream reconnects, and so does ``run``.
        self._set_state("close", REPLACED)
        await self._end_client()

    async def _end_for_good(self, reason: int, why: str) -> None:
        self._ended = True
        log.warning("whatsapp.session_closed", instance=self.instance, reason=why)
        self._set_state("close", reason)
        await self._end_client()

    async def _on_logged_out(self, _: Any, event: Any) -> None:
        self.emit([("logout.instance", None)])  # upstream's data is null
        reason = events.ConnectFailureReason.Name(event.Reason) if event.HasField("Reason") else "unknown"
        await self._end_for_good(LOGGED_OUT, f"logged out ({reason})")

    async def _on_banned(self, _: Any, event: Any) -> None:
        await self._end_for_good(FORBIDDEN, f"temporarily banned, expires in {event.Expire} s")

    async def _on_outdated(self, _: Any, __: Any) -> None:
        await self._end_for_good(OUTDATED, "client outdated: upgrade neonize")
