"""WebSocket: live streams of events to connected clients, on the daemon's own port.

``ws://host:PORT/`` streams every instance's events (when ``WEBSOCKET_GLOBAL_EVENTS`` is on);
``ws://host:PORT/{instance}`` streams the events that instance subscribed to in its
``websocket`` settings. ``?events=messages.upsert,connection.update`` narrows a stream further.
Each message is the envelope as JSON text.

Delivery is live only: an event goes to the clients connected when it is accepted, without
replay and without the store, so a client never holds up another sink. Every client has a
bounded buffer (``ROUTER_WEBSOCKET_BUFFER`` messages and ``ROUTER_WEBSOCKET_BUFFER_BYTES``); a
client that falls that far behind is disconnected with the reason, and counted, so the daemon's
memory stays flat.

Auth: the ``apikey`` query parameter or header must be the global key, or that instance's
token for its own stream, unless the client's address is in ``WEBSOCKET_ALLOWED_HOSTS``.
Refused clients are closed with code 1008 and a reason that says why.

socket.io v4, as upstream serves it, on the same port (``/socket.io/``): namespace
``/{instance}`` for an instance, ``/`` for global, socket.io event name = wire name, the
envelope as the event's argument. Existing clients (``io("http://host:8080/my-instance")``)
work unchanged. The same auth applies (query, header, or ``auth: {apikey}``); a refused
client gets ``connect_error`` with the reason. A socket.io client whose queue holds more than
``ROUTER_WEBSOCKET_BUFFER`` packets is disconnected, as a plain one is.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Coroutine, Sequence
from typing import Any

import orjson
import socketio
from aiohttp import WSCloseCode, web
from socketio.exceptions import ConnectionRefusedError as SocketIoRefused

from router import logs
from router.addresses import AddressList
from router.apikeys import key_matches
from router.current import Current
from router.events import EVERY_EVENT, WIRE_NAMES, Event, envelope
from router.settings import Settings

log = logs.get_logger("router.sinks.websocket")


class Client:
    """One connected client: its stream, its filter and its bounded send buffer."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        instance: str | None,
        events: frozenset[str] | None,
        limit: int,
        limit_bytes: int,
    ):
        self.ws = ws
        self.instance = instance  # None: the global stream
        self.events = events  # None: no narrowing
        self.limit = limit
        self.limit_bytes = limit_bytes
        self.buffer: collections.deque[str] = collections.deque()
        self.buffered_bytes = 0  # of text waiting (JSON is ASCII but for what the events carry)
        self.ready = asyncio.Event()
        self.dropped: str | None = None  # why the hub disconnected it

    def offer(self, text: str) -> str | None:
        """Queue ``text``; or why not, when the client is too far behind (the caller drops it)."""
        if len(self.buffer) >= self.limit:
            return f"too slow: more than {self.limit} messages waiting"
        if self.buffered_bytes + len(text) > self.limit_bytes and self.buffer:
            return f"too slow: more than {self.limit_bytes} bytes waiting"
        self.buffer.append(text)
        self.buffered_bytes += len(text)
        self.ready.set()
        return None

    async def pump(self) -> None:
        """Send what is buffered, in order, until the connection ends."""
        while not self.ws.closed:
            if not self.buffer:
                self.ready.clear()
                await self.ready.wait()
                continue
            text = self.buffer.popleft()
            self.buffered_bytes -= len(text)
            await self.ws.send_str(text)


class WebSocketHub:
    """Accepts clients and fans accepted events out to them."""

    def __init__(self, settings: Settings, current: Current) -> None:
        self.settings = settings
        self.current = current
        self.allowed_hosts = AddressList(settings.websocket_allowed_hosts)
        self.clients: set[Client] = set()
        self.sent = 0  # messages handed to clients
        self.slow_disconnects = 0  # clients dropped for falling behind
        self._closing: set[asyncio.Task[Any]] = set()
        origins = [o.strip() for o in settings.cors_origin.split(",") if o.strip()]
        self.sio = socketio.AsyncServer(
            async_mode="aiohttp",
            namespaces="*",
            cors_allowed_origins="*" if "*" in origins else origins,
            logger=False,
            engineio_logger=False,
        )
        self.sio.on("connect", self._sio_connect, namespace="*")
        self.sio.on("disconnect", self._sio_disconnect, namespace="*")
        self.sio_clients: collections.Counter[str] = collections.Counter()  # by namespace
        self._sio_dropped: set[str] = set()  # engine.io sessions dropped for falling behind

    def add_routes(self, app: web.Application) -> None:
        """socket.io, ``/`` and ``/{instance}``; add them last, after the daemon's own paths."""
        self.sio.attach(app)
        app.router.add_get("/", self.handle)
        app.router.add_get("/{instance}", self.handle)

    def _refusal(self, request: web.Request, instance: str | None, auth: Any = None) -> str | None:
        """Why this client may not connect, or None."""
        if instance is None and not self.settings.websocket_global_events:
            return "global events are off (WEBSOCKET_GLOBAL_EVENTS=false); connect to /<instance>"
        origin = request.headers.get("Origin")
        allowed_origins = {o.strip() for o in self.settings.cors_origin.split(",")}
        if origin and "*" not in allowed_origins and origin not in allowed_origins:
            return f"origin {origin!r} is not in CORS_ORIGIN"
        if request.remote in self.allowed_hosts:
            return None
        given = request.query.get("apikey") or request.headers.get("apikey")
        if not given and isinstance(auth, dict) and isinstance(auth.get("apikey"), str):
            given = auth["apikey"]
        if not given:
            return "missing apikey (query parameter or header)"
        if key_matches(given, self.settings.authentication_api_key):
            return None
        if instance is not None and key_matches(given, self.current.routes.token_of(instance)):
            return None
        return "invalid apikey" + (f" for instance {instance!r}" if instance is not None else "")

    @staticmethod
    def _narrowing(request: web.Request) -> tuple[frozenset[str] | None, str | None]:
        raw = request.query.get("events")
        if not raw:
            return None, None
        names = frozenset(name.strip() for name in raw.split(",") if name.strip())
        unknown = sorted(names - set(WIRE_NAMES))
        if unknown:
            return None, f"unknown event {', '.join(repr(u) for u in unknown)} in ?events="
        return names, None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        instance = request.match_info.get("instance")
        ws = web.WebSocketResponse(heartbeat=30, max_msg_size=64 * 1024)
        if not ws.can_prepare(request).ok:
            return web.json_response(
                {"error": "this path serves WebSocket clients; connect with a WebSocket upgrade"}, status=400
            )
        await ws.prepare(request)
        events, bad_filter = self._narrowing(request)
        reason = self._refusal(request, instance) or bad_filter
        if reason is not None:
            log.warning(
                "websocket.refused", kind="WEBSOCKET", instance=instance, remote=request.remote, reason=reason
            )
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=reason.encode()[:120])
            return ws
        settings = self.settings
        client = Client(
            ws, instance, events, settings.router_websocket_buffer, settings.router_websocket_buffer_bytes
        )
        self.clients.add(client)
        log.info("websocket.connected", kind="WEBSOCKET", instance=instance, remote=request.remote)
        pump = asyncio.create_task(client.pump())
        try:
            async for _ in ws:  # clients only listen; reading keeps pings and closes flowing
                pass
        finally:
            self.clients.discard(client)
            pump.cancel()
            log.info(
                "websocket.disconnected",
                kind="WEBSOCKET",
                instance=instance,
                remote=request.remote,
                reason=client.dropped or "closed",
            )
        return ws

    async def _sio_connect(self, namespace: str, sid: str, environ: dict[str, Any], auth: Any) -> None:
        request: web.Request = environ["aiohttp.request"]
        instance = None if namespace == "/" else namespace.removeprefix("/")
        reason = self._refusal(request, instance, auth)
        if reason is not None:
            log.warning(
                "websocket.refused", kind="WEBSOCKET", instance=instance, remote=request.remote, reason=reason
            )
            raise SocketIoRefused(reason)
        self.sio_clients[namespace] += 1
        log.info(
            "websocket.connected", kind="WEBSOCKET", instance=instance, remote=request.remote, socketio=True
        )

    async def _sio_disconnect(self, namespace: str, sid: str, *_: Any) -> None:
        self.sio_clients[namespace] -= 1
        if self.sio_clients[namespace] <= 0:
            del self.sio_clients[namespace]

    async def _emit_all(self, emits: list[tuple[str, str, Any]]) -> None:
        sockets = self.sio.eio.sockets
        self._sio_dropped &= set(sockets)  # those gone for good are forgotten
        for sid, socket in list(sockets.items()):
            if sid not in self._sio_dropped and socket.queue.qsize() > self.settings.router_websocket_buffer:
                self._sio_dropped.add(sid)  # counted and logged once, however long it takes to go
                self.slow_disconnects += 1
                log.warning(
                    "websocket.slow_client",
                    kind="WEBSOCKET",
                    socketio=True,
                    reason=f"too slow: more than {self.settings.router_websocket_buffer} packets waiting",
                )
                await socket.close(wait=False, abort=True)
        for namespace, name, data in emits:
            await self.sio.emit(name, data, namespace=namespace)
            self.sent += 1

    def _background(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def publish(self, events: Sequence[Event]) -> None:
        """Hand ``events`` to every client whose stream includes them (never waits)."""
        if not self.clients and not self.sio_clients:
            return
        routes = self.current.routes
        global_on = self.settings.websocket_global_events
        emits: list[tuple[str, str, Any]] = []  # socket.io: (namespace, event name, envelope)
        for event in events:
            subscribed = event.event in routes.websocket_events(event.instance)
            # The global stream is "all events": application.startup only for ?events= naming it.
            everything = global_on and event.event in EVERY_EVENT
            receivers = [
                client
                for client in self.clients
                if (
                    client.instance == event.instance and subscribed
                    if client.instance is not None
                    else global_on and (everything or client.events is not None)
                )
                and (client.events is None or event.event in client.events)
            ]
            namespaces = [
                namespace
                for namespace, wanted in (("/", everything), (f"/{event.instance}", subscribed))
                if wanted and namespace in self.sio_clients
            ]
            if not receivers and not namespaces:
                continue
            text = envelope(event, server_url=event.server_url, apikey=event.apikey).decode()
            sent = 0
            for client in receivers:
                if (why := client.offer(text)) is None:
                    sent += 1
                else:
                    self._drop_slow(client, why)
            if namespaces:
                data = orjson.loads(text)
                emits += [(namespace, event.event, data) for namespace in namespaces]
            self.sent += sent
            if sent and logs.is_enabled("WEBSOCKET"):
                log.info(
                    "websocket.sent",
                    kind="WEBSOCKET",
                    instance=event.instance,
                    _event=event.event,
                    event_id=event.id,
                    clients=sent,
                )
        if emits:
            self._background(self._emit_all(emits))

    def _drop_slow(self, client: Client, why: str) -> None:
        self.clients.discard(client)
        self.slow_disconnects += 1
        client.dropped = why
        client.buffer.clear()
        client.buffered_bytes = 0
        log.warning(
            "websocket.slow_client", kind="WEBSOCKET", instance=client.instance, reason=client.dropped
        )
        self._background(client.ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=client.dropped.encode()))

    async def close_all(self) -> None:
        for client in list(self.clients):
            await client.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutdown")
        await self.sio.shutdown()
