"""WebSocket clients of every router see the events any router accepted (with PostgreSQL).

After intake commits events, this router hands them to its own WebSocket clients and relays
them to the other routers: ``NOTIFY router_live`` with the events as JSON (several to a
notification, up to PostgreSQL's 8000-byte payload); an event larger than that goes into the
``live_events`` table (kept a minute) and the notification carries its row id. Each router
listens and hands what other routers relayed to its own clients. Like the WebSocket stream
itself, this is live delivery: a router that is down misses what happened meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence

import asyncpg
import orjson

from router import logs
from router.events import Event
from router.redact import redact_url
from router.store.pg_schema import DATABASE_ERRORS

log = logs.get_logger("router.live_relay")
CHANNEL = "router_live"
PAYLOAD_MAX = 7900
KEEP_S = 60.0
CHECK_S = 5.0  # how often an idle router checks that its connection (and so its listening) holds
Publish = Callable[[Sequence[Event]], None]


def _encode(event: Event) -> bytes:
    fields = {
        "id": event.id,
        "instance": event.instance,
        "event": event.event,
        "data": event.data.decode(),
        "date_time": event.date_time,
        "sender": event.sender,
        "server_url": event.server_url,
        "apikey": event.apikey,
    }
    return orjson.dumps(fields)


def _decode(raw: dict[str, object]) -> Event:
    data = raw.pop("data")
    assert isinstance(data, str)
    return Event(data=data.encode(), **raw)  # type: ignore[arg-type]


class LiveRelay:
    def __init__(self, url: str, publish: Publish) -> None:
        self.url = url
        self.publish_here = publish
        self._conn: asyncpg.Connection | None = None
        self._outbox: list[bytes] = []
        self._ready = asyncio.Event()
        self._inbox: asyncio.Queue[str] = asyncio.Queue()
        self._reader: asyncpg.Connection | None = None  # reads back events relayed through the table

    async def start(self) -> None:
        self._conn = await asyncpg.connect(self.url)
        await self._conn.add_listener(CHANNEL, self._notified)

    def publish(self, events: Sequence[Event]) -> None:
        """Intake's hook: this router's clients now, the other routers' soon (never waits)."""
        self.publish_here(events)
        self._outbox.extend(_encode(event) for event in events)
        self._ready.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._receive())
            await self._send()

    async def _send(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), CHECK_S)
            if self._conn is None or self._conn.is_closed():
                await self._reconnect()  # listening again: other routers' events reach us again
                continue
            self._ready.clear()
            outbox, self._outbox = self._outbox, []
            try:
                await self._relay(outbox)
            except DATABASE_ERRORS as exc:
                log.error("websocket.relay_failed", database=redact_url(self.url), error=str(exc))
                await self._reconnect()

    async def _relay(self, outbox: list[bytes]) -> None:
        assert self._conn is not None
        payload: list[bytes] = []
        size, stored = 2, False
        for body in outbox:
            item = body
            if len(body) + 1 > PAYLOAD_MAX:  # too large for a notification: through the table
                row = await self._conn.fetchval(
                    "INSERT INTO live_events (body, at) VALUES ($1, $2) RETURNING id", body, time.time()
                )
                item, stored = orjson.dumps({"row": row}), True
            if size + len(item) + 1 > PAYLOAD_MAX and payload:
                await self._notify(payload)
                payload, size = [], 2
            payload.append(item)
            size += len(item) + 1
        if payload:
            await self._notify(payload)
        if stored:
            await self._conn.execute("DELETE FROM live_events WHERE at < $1", time.time() - KEEP_S)

    async def _notify(self, payload: list[bytes]) -> None:
        assert self._conn is not None
        text = (b"[" + b",".join(payload) + b"]").decode()
        await self._conn.execute("SELECT pg_notify($1, $2)", CHANNEL, text)

    def _notified(self, conn: object, pid: int, channel: str, payload: str) -> None:
        if self._conn is not None and pid != self._conn.get_server_pid():  # our own: shown already
            self._inbox.put_nowait(payload)

    async def _receive(self) -> None:
        """Other routers' notifications, one after another, so their events keep their order."""
        try:
            while True:
                raws = orjson.loads(await self._inbox.get())
                events = []
                for raw in raws:
                    fields = await self._read_back(raw["row"]) if "row" in raw else raw
                    if fields is not None:
                        events.append(_decode(fields))
                self.publish_here(events)
        finally:
            if self._reader is not None:
                await self._reader.close()

    async def _read_back(self, row: int) -> dict[str, object] | None:
        """An event relayed through the table; None if it is gone (pruned) or cannot be read
        (the database went away: left out, as a live stream leaves out what it could not hear)."""
        try:
            if self._reader is None or self._reader.is_closed():
                self._reader = await asyncpg.connect(self.url)
            body = await self._reader.fetchval("SELECT body FROM live_events WHERE id = $1", row)
        except DATABASE_ERRORS as exc:
            log.error("websocket.relay_failed", database=redact_url(self.url), error=str(exc))
            return None
        return None if body is None else dict(orjson.loads(body))

    async def _reconnect(self) -> None:
        await self.close()
        with contextlib.suppress(*DATABASE_ERRORS):
            await asyncio.sleep(1)
            await self.start()

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None
