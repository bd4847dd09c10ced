"""Pusher Channels: channel = instance name, event = wire name, data = the envelope.

Requests go to the Pusher HTTP API over one pooled aiohttp session, signed as Pusher requires
(``auth_key``, ``auth_timestamp``, ``auth_version``, ``body_md5`` and an HMAC-SHA256
``auth_signature``, with the ``pusher`` package's signing). Several events waiting for one app
go out in one ``batch_events`` request (up to 10); a lone event uses ``events``.

Pusher refuses ``data`` over 10240 bytes: ``data.message.base64`` and ``data.qrcode.base64``
are dropped first, and a message still too large is a dead letter naming its size. 4xx answers
other than 429 are permanent; 429, 5xx and connection errors are retried.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from pydantic import AliasChoices, BaseModel, Field, field_validator, model_validator

from router.errors import PermanentError, RetryableError
from router.events import Event, envelope, strip_message_base64
from router.sections import Subscription
from router.sinks import BaseSink, Configured, Placement, SinkKind, tcp_reachable
from router.sinks.batching import Batcher, Item


class PusherSettings(BaseModel):
    """Upstream's Pusher settings, and ``PUSHER_HOST``/``PUSHER_PORT`` (ours)."""

    pusher_enabled: bool = False
    pusher_global_enabled: bool = False
    pusher_global_app_id: str | None = None
    pusher_global_key: str | None = None
    pusher_global_secret: str | None = None
    pusher_global_cluster: str | None = None
    pusher_global_use_tls: bool = True
    pusher_host: str | None = None  # a Pusher-protocol server other than api-<cluster>.pusher.com
    pusher_port: int | None = Field(None, ge=1, le=65535)

    @field_validator(
        "pusher_global_app_id",
        "pusher_global_key",
        "pusher_global_secret",
        "pusher_global_cluster",
        "pusher_host",
        "pusher_port",
        mode="before",
    )
    @classmethod
    def _pusher_empty_is_unset(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _pusher_consistent(self) -> PusherSettings:
        if self.pusher_enabled and self.pusher_global_enabled:
            names = ("pusher_global_app_id", "pusher_global_key", "pusher_global_secret")
            missing = [name.upper() for name in names if not getattr(self, name)]
            if not (self.pusher_global_cluster or self.pusher_host):
                missing.append("PUSHER_GLOBAL_CLUSTER (or PUSHER_HOST)")
            if missing:
                raise ValueError(f"PUSHER_GLOBAL_ENABLED is true but {', '.join(missing)} not set")
        return self


class PusherConfig(Subscription):
    """An instance's ``pusher:`` section: its own app."""

    app_id: str | None = Field(None, validation_alias=AliasChoices("appId", "app_id"))
    key: str | None = None
    secret: str | None = None
    cluster: str | None = None
    use_tls: bool = Field(True, validation_alias=AliasChoices("useTLS", "use_tls"))

    @field_validator("app_id", mode="before")
    @classmethod
    def _app_id_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value


@dataclass(frozen=True, slots=True)
class PusherTarget:
    """One Pusher app (global credentials, or an instance's own): channel = instance."""

    key: str
    instance: str | None
    events: frozenset[str]
    app_id: str
    app_key: str
    secret: str
    cluster: str
    use_tls: bool
    sink = "pusher"


BATCH_LIMIT = 10  # events per batch_events request (a Pusher limit)
MAX_DATA_BYTES = 10240  # Pusher's limit on one event's data
MEDIA = ("message", "qrcode")  # parents of the base64 media that is dropped first
REQUEST_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class _Message:
    target: PusherTarget
    channel: str
    name: str
    data: str


def signed_query(target: PusherTarget, method: str, path: str, body: bytes) -> str:
    """The query string of a signed Pusher API request (Pusher's HTTP API authentication)."""
    from pusher.http import make_query_string  # noqa: PLC0415 - the pusher package loads much: when used
    from pusher.signature import sign  # noqa: PLC0415

    params = {
        "auth_key": target.app_key,
        "auth_timestamp": f"{time.time():.0f}",
        "auth_version": "1.0",
        "body_md5": hashlib.md5(body).hexdigest(),  # Pusher's protocol asks for MD5; not a secret
    }
    params["auth_signature"] = sign(target.secret, f"{method}\n{path}\n{make_query_string(params)}")
    return str(make_query_string(params))


class PusherSink(BaseSink):
    name = "pusher"

    def __init__(self, settings: PusherSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None
        self._batcher: Batcher[_Message] = Batcher(BATCH_LIMIT, self._send_batch, "Pusher request")
        self.requests = 0  # API requests made, for the benchmark

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
            cookie_jar=aiohttp.DummyCookieJar(),
            json_serialize=lambda value: orjson.dumps(value).decode(),
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def base_url(self, target: PusherTarget) -> str:
        settings = self.settings
        scheme = "https" if target.use_tls else "http"
        host = settings.pusher_host or f"api-{target.cluster}.pusher.com"
        port = settings.pusher_port or (443 if target.use_tls else 80)
        return f"{scheme}://{host}:{port}"

    def where(self, target: PusherTarget, event: Event) -> dict[str, str]:
        return {"app_id": target.app_id, "channel": event.instance}

    async def check(self, targets: Sequence[PusherTarget]) -> None:
        """Pusher's API host answers (a connection, no API call: those count against quotas)."""
        for url in sorted({self.base_url(target) for target in targets}):
            await tcp_reachable(url)

    async def send(self, target: PusherTarget, event: Event) -> int | None:
        data = self.data(target, event)
        await self._batcher.submit(target.key, _Message(target, event.instance, event.event, data))
        return None

    def data(self, target: PusherTarget, event: Event) -> str:
        """The envelope as Pusher's ``data`` string, within Pusher's size limit."""

        def build(data: bytes) -> bytes:
            app_id, server_url, apikey = target.app_id, event.server_url, event.apikey
            return envelope(event, destination=app_id, server_url=server_url, apikey=apikey, data=data)

        body = build(event.data)
        if len(body) > MAX_DATA_BYTES:
            body = build(strip_message_base64(event.data, MEDIA))
        if len(body) > MAX_DATA_BYTES:
            raise PermanentError(
                f"message of {len(body)} bytes is over Pusher's {MAX_DATA_BYTES}-byte limit"
                " (base64 media already removed)"
            )
        return body.decode()

    async def _send_batch(self, app: str, batch: list[Item[_Message]]) -> None:
        assert self._session is not None, "PusherSink.send before open"
        target = batch[0].payload.target
        if len(batch) == 1:
            message = batch[0].payload
            path = f"/apps/{target.app_id}/events"
            payload: object = {"name": message.name, "channels": [message.channel], "data": message.data}
        else:
            path = f"/apps/{target.app_id}/batch_events"
            payload = {
                "batch": [
                    {"channel": m.channel, "name": m.name, "data": m.data} for m in (i.payload for i in batch)
                ]
            }
        body = orjson.dumps(payload)
        url = f"{self.base_url(target)}{path}?{signed_query(target, 'POST', path, body)}"
        self.requests += 1
        try:
            async with self._session.post(
                url, data=body, headers={"Content-Type": "application/json"}
            ) as response:
                text = (await response.text())[:300]
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RetryableError(f"Pusher unreachable: {type(exc).__name__}: {exc}") from exc
        if 200 <= status < 300:
            for item in batch:
                item.succeed()
            return
        error = f"Pusher answered HTTP {status}: {text}"
        if 400 <= status < 500 and status != 429:
            raise PermanentError(error, status=status)
        raise RetryableError(error, status=status)


class PusherKind(SinkKind):
    name = "pusher"
    settings = PusherSettings
    section = PusherConfig
    event_flags = "PUSHER_EVENTS_"

    def enabled(self, settings: PusherSettings) -> bool:
        return settings.pusher_enabled

    def open(self, settings: PusherSettings) -> PusherSink:
        return PusherSink(settings)

    def place(self, settings: Any, instances: Mapping[str, Configured]) -> Iterable[Placement]:
        if settings.pusher_global_enabled:
            yield Placement(
                PusherTarget(
                    key="pusher:global",
                    instance=None,
                    events=settings.events_enabled(self.name),
                    app_id=settings.pusher_global_app_id or "",
                    app_key=settings.pusher_global_key or "",
                    secret=settings.pusher_global_secret or "",
                    cluster=settings.pusher_global_cluster or "mt1",
                    use_tls=settings.pusher_global_use_tls,
                )
            )
        for name, config in instances.items():
            push = config.sections.get(self.name)
            if isinstance(push, PusherConfig) and push.enabled and push.app_id and push.key and push.secret:
                target = PusherTarget(
                    key=f"pusher:instance:{name}",
                    instance=name,
                    events=push.subscribed(),
                    app_id=push.app_id,
                    app_key=push.key,
                    secret=push.secret,
                    cluster=push.cluster or "mt1",
                    use_tls=push.use_tls,
                )
                yield Placement(target, name)

    def describe(self, target: PusherTarget, settings: Any) -> str:
        return f"app {target.app_id}, channel <instance>"

    def instance_problems(self, name: str, section: PusherConfig) -> list[tuple[tuple[str | int, ...], str]]:
        if not section.enabled:
            return []
        return [
            (("pusher", "enabled"), f"pusher is enabled but has no {alias}")
            for field_name, alias in (("app_id", "appId"), ("key", "key"), ("secret", "secret"))
            if not getattr(section, field_name)
        ]

    def secrets(self, settings: PusherSettings) -> list[str | None]:
        return [settings.pusher_global_secret]

    def section_secrets(self, section: PusherConfig) -> list[str | None]:
        return [section.secret]

    def row(self, section: PusherConfig) -> dict[str, Any]:
        return {
            "appId": section.app_id,
            "key": section.key,
            "secret": section.secret,
            "cluster": section.cluster,
            "useTLS": section.use_tls,
        }


KIND = PusherKind()
