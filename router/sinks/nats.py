"""NATS: publish the envelope to upstream's subjects, acknowledged, from the durable queue.

Settings (upstream's): ``NATS_ENABLED``, ``NATS_URI``, ``NATS_GLOBAL_ENABLED``,
``NATS_PREFIX_KEY``, ``NATS_EVENTS_<EVENT>`` (``NATS_EXCHANGE_NAME`` is accepted and unused, as
upstream's NATS has no exchanges). Section: ``nats: {enabled, events}``.

Subjects as upstream: ``{instance}.{event}`` for an instance that subscribed, and
``{NATS_PREFIX_KEY}.{event}`` (or ``{event}``) for the global subscription; two targets, so an
event for both is two publishes, as upstream makes them. The body is the envelope (no
``destination``), with the header ``Nats-Msg-Id`` = the event id, so a JetStream stream that
captures the subject stores a retried publish once.

Upstream publishes and forgets. Here a publish is done only once the server has answered for
it: when a JetStream stream captures the subject (asked of JetStream, and remembered for
``STREAM_CACHE_S``), JetStream's publish acknowledgement; otherwise a core publish followed by a
flush, the server's answer to a ping sent after it, so it has taken the message for the
subscribers there are. No answer in time is a failed attempt, retried from the store.

One connection, kept by one task: opened with the queue retry backoff for as long as it takes;
while it is down (nats-py reconnecting) the sink is not ``ready`` and workers wait without
making or counting attempts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError, NotFoundError
from pydantic import BaseModel, field_validator, model_validator

from router import logs
from router.errors import PermanentError, RetryableError, Unavailable
from router.events import Event, envelope
from router.sections import Subscription
from router.sinks import Placement, SinkKind, subscribed
from router.sinks.keeper import KeptConnectionSink

if TYPE_CHECKING:
    from router.instances import InstanceConfig

log = logs.get_logger("router.sinks.nats")
CONNECT_TIMEOUT_S = 5.0
CHECK_WAIT_S = 2.0
PUBLISH_TIMEOUT_S = 10.0
STREAM_CACHE_S = 30.0  # how long whether a stream captures a subject is remembered
STREAM_CACHE_SIZE = 10_000


class NatsSettings(BaseModel):
    nats_enabled: bool = False
    nats_uri: str | None = None
    nats_global_enabled: bool = False
    nats_prefix_key: str = ""
    nats_exchange_name: str = "evolution_exchange"  # upstream's, unused by its NATS too

    @field_validator("nats_uri", "nats_prefix_key", mode="before")
    @classmethod
    def _nats_empty(cls, value: Any) -> Any:
        return value.strip() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _nats_consistent(self) -> NatsSettings:
        if self.nats_enabled and not self.nats_uri:
            raise ValueError("NATS_ENABLED is true but NATS_URI is not set")
        for server in (self.nats_uri or "").split(","):
            if server and urlsplit(server.strip()).scheme not in ("nats", "tls", "ws", "wss"):
                raise ValueError("NATS_URI must be nats:// (or tls://) server URLs, comma-separated")
        return self


@dataclass(frozen=True, slots=True)
class NatsTarget:
    key: str
    instance: str | None  # None: the global subscription, subjects under NATS_PREFIX_KEY
    events: frozenset[str]
    sink = "nats"


def subject(target: NatsTarget, event: Event, prefix: str) -> str:
    if target.instance is not None:
        return f"{target.instance}.{event.event}"
    return f"{prefix}.{event.event}" if prefix else event.event


class NatsSink(KeptConnectionSink):
    name = "nats"

    def __init__(self, settings: Any) -> None:  # NatsSettings, within the daemon's Settings
        assert settings.nats_uri is not None
        super().__init__(settings)
        self.servers = [server.strip() for server in settings.nats_uri.split(",") if server.strip()]
        self.prefix = settings.nats_prefix_key
        self._client: Client | None = None
        self._streams: dict[str, tuple[bool, float]] = {}  # subject -> (captured, until)

    def where(self, target: NatsTarget, event: Event) -> dict[str, str]:
        return {"subject": subject(target, event, self.prefix)}

    async def aclose(self) -> None:
        await self._stop_keeper()
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
        """Whether a JetStream stream captures subject ``name`` (remembered a while)."""
        now = time.monotonic()
        known = self._streams.get(name)
        if known is not None and known[1] > now:
            return known[0]
        try:
            await client.jsm().find_stream_name_by_subject(name)
            captured = True
        except (NotFoundError, NoRespondersError, NatsTimeout, APIError):
            captured = False  # no stream for it, or no JetStream on this server
        if len(self._streams) >= STREAM_CACHE_SIZE:
            self._streams.clear()
        self._streams[name] = (captured, now + STREAM_CACHE_S)
        return captured

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
                await client.flush(timeout=int(PUBLISH_TIMEOUT_S))
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


class NatsKind(SinkKind):
    name = "nats"
    settings = NatsSettings
    section = Subscription
    event_flags = "NATS_EVENTS_"

    def enabled(self, settings: NatsSettings) -> bool:
        return settings.nats_enabled

    def open(self, settings: NatsSettings) -> NatsSink:
        return NatsSink(settings)

    def place(self, settings: Any, instances: Mapping[str, InstanceConfig]) -> Iterable[Placement]:
        if settings.nats_global_enabled:
            yield Placement(NatsTarget("nats:global", None, settings.events_enabled(self.name)))
        for name, own in subscribed(self.name, instances):
            yield Placement(NatsTarget(f"nats:instance:{name}", name, own.subscribed()), name)

    def describe(self, target: NatsTarget, settings: NatsSettings) -> str:
        if target.instance is not None:
            return f"subjects {target.instance}.<event>"
        prefix = settings.nats_prefix_key
        return f"subjects {prefix}.<event>" if prefix else "subjects <event>"

    def secrets(self, settings: NatsSettings) -> list[str | None]:
        return [urlsplit(server).password for server in (settings.nats_uri or "").split(",")]


KIND = NatsKind()
