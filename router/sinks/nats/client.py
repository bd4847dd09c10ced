"""The NATS client: one connection kept, acknowledged publishes. Imported only when the sink is
enabled (nats-py is a quarter of a start with 10,000 instances)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import nats
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError, NotFoundError

from router import logs
from router.errors import PermanentError, RetryableError, Unavailable
from router.events import Event, envelope
from router.sinks.keeper import KeptConnectionSink
from router.sinks.nats.config import NatsTarget, subject
from router.sinks.singleflight import SingleFlight

log = logs.get_logger("router.sinks.nats")
CONNECT_TIMEOUT_S = 5.0
CHECK_WAIT_S = 2.0
PUBLISH_TIMEOUT_S = 10.0
STREAM_CACHE_S = 30.0  # how long whether a stream captures a subject is remembered
STREAM_CACHE_SIZE = 10_000


class NatsSink(KeptConnectionSink):
    name = "nats"

    def __init__(self, settings: Any) -> None:  # NatsSettings, within the daemon's Settings
        assert settings.nats_uri is not None
        super().__init__(settings)
        self.servers = [server.strip() for server in settings.nats_uri.split(",") if server.strip()]
        self.prefix = settings.nats_prefix_key
        self._client: Client | None = None
        self._streams: dict[str, tuple[bool, float]] = {}  # subject -> (captured, until)
        self._lookups: SingleFlight[bool] = SingleFlight()  # subjects being looked up
        # The next flush, shared by every publish made before it is sent (``_flushed``).
        self._flush: asyncio.Future[None] | None = None
        self._flushing: set[asyncio.Task[None]] = set()

    def where(self, target: NatsTarget, event: Event) -> dict[str, str]:
        return {"subject": subject(target, event, self.prefix)}

    async def aclose(self) -> None:
        await self._stop_keeper()
        self._lookups.cancel()
        client, self._client = self._client, None
        if client is not None and not client.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), CONNECT_TIMEOUT_S)

    async def check(self, targets: Sequence[NatsTarget]) -> None:
        try:
            await asyncio.wait_for(self._up.wait(), CHECK_WAIT_S)
        except TimeoutError:
            raise RetryableError(f"NATS unreachable: {self._last_error}") from None

    async def _keep_connected(self) -> None:
        """Connect, with backoff, for as long as it takes; nats-py then reconnects by itself, and
        its callbacks say when the connection is down and up again. One line per change."""
        failures = 0
        while not self._closing:  # a cancellation nats-py's connect lost must not keep this going
            closed = asyncio.Event()

            async def disconnected() -> None:
                self.connected = False
                if self._up.is_set() and not self._closing:  # not when the daemon closes it
                    log.warning("nats.disconnected", hint="events wait in the store")
                self._up.clear()
                self._last_error = "the connection was lost"

            async def reconnected() -> None:
                self.connected = True
                self._up.set()
                log.info("nats.connected")

            async def on_closed(closed: asyncio.Event = closed) -> None:
                self._up.clear()
                closed.set()

            async def on_error(error: Exception) -> None:
                self._last_error = logs.scrub(f"{type(error).__name__}: {error}")

            try:
                client = await nats.connect(
                    servers=self.servers,
                    connect_timeout=CONNECT_TIMEOUT_S,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=self.backoff.initial_delay_s,
                    disconnected_cb=disconnected,
                    reconnected_cb=reconnected,
                    closed_cb=on_closed,
                    error_cb=on_error,
                )
            except (NatsError, OSError, TimeoutError) as exc:
                failures += 1
                self._last_error = logs.scrub(f"{type(exc).__name__}: {exc}")
                if failures == 1:
                    log.error("nats.unreachable", error=self._last_error, hint="events wait in the store")
                await asyncio.sleep(self.backoff.delay_s(failures))
                continue
            failures = 0
            self._client = client
            self.connected = True
            self._up.set()
            log.info("nats.connected")
            await closed.wait()

    async def _captured(self, client: Client, name: str) -> bool:
        """Whether a JetStream stream captures subject ``name`` (remembered a while; the
        publishes that want it while it is being looked up wait for that one answer)."""
        known = self._streams.get(name)
        if known is not None and known[1] > time.monotonic():
            return known[0]
        return await self._lookups.ask(name, lambda: self._look_up(client, name))

    async def _look_up(self, client: Client, name: str) -> bool:
        try:
            await client.jsm().find_stream_name_by_subject(name)
            captured = True
        except (NotFoundError, NoRespondersError, NatsTimeout, APIError):
            captured = False  # no stream for it, or no JetStream on this server
        if len(self._streams) >= STREAM_CACHE_SIZE:
            self._streams.clear()
        self._streams[name] = (captured, time.monotonic() + STREAM_CACHE_S)
        return captured

    def _flushed(self, client: Client) -> asyncio.Future[None]:
        """Resolves once the server answered a ping sent after every publish made so far.

        The publishes of one turn of the event loop share that ping: the same acknowledgement
        as a flush after each, one ping (a write to the socket) for them all."""
        if self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.create_future()
            self._flush.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
            loop.call_soon(self._ping, client)
        return self._flush

    def _ping(self, client: Client) -> None:
        waiting, self._flush = self._flush, None
        assert waiting is not None
        task = asyncio.ensure_future(client.flush(timeout=int(PUBLISH_TIMEOUT_S)))
        self._flushing.add(task)

        def answered(task: asyncio.Task[None]) -> None:
            self._flushing.discard(task)
            if waiting.done():
                return
            if task.cancelled():
                waiting.cancel()
            elif (exc := task.exception()) is not None:
                waiting.set_exception(exc)
            else:
                waiting.set_result(None)

        task.add_done_callback(answered)

    async def send(self, target: NatsTarget, event: Event) -> int | None:
        client = self._client
        if client is None or not self._up.is_set():
            raise Unavailable(f"NATS unavailable: {self._last_error}")
        body = envelope(event, server_url=event.server_url, apikey=event.apikey)
        headers = {"Nats-Msg-Id": event.id, "Content-Type": "application/json"}
        name = subject(target, event, self.prefix)
        try:
            if await self._captured(client, name):
                await client.jetstream().publish(name, body, timeout=PUBLISH_TIMEOUT_S, headers=headers)
            else:
                await client.publish(name, body, headers=headers)
                await asyncio.shield(self._flushed(client))
        except APIError as exc:
            self._streams.pop(name, None)  # the stream may have changed: ask again next time
            if exc.code is not None and 400 <= exc.code < 500 and exc.code not in (408, 429):
                raise PermanentError(f"JetStream refused the message: {exc}") from exc
            raise RetryableError(f"JetStream: {exc}") from exc
        except (NatsTimeout, TimeoutError) as exc:
            self._streams.pop(name, None)
            raise RetryableError(f"no acknowledgement within {PUBLISH_TIMEOUT_S:g} s") from exc
        except (NatsError, OSError) as exc:
            if not client.is_connected:
                raise Unavailable(f"NATS unavailable: {type(exc).__name__}: {exc}") from exc
            raise RetryableError(f"NATS: {type(exc).__name__}: {exc}") from exc
        return None
