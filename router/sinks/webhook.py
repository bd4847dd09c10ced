"""HTTP webhooks: POST the envelope as JSON over pooled keep-alive connections.

Settings: ``WEBHOOK_GLOBAL_*``, ``WEBHOOK_EVENTS_<EVENT>``, ``WEBHOOK_REQUEST_TIMEOUT_MS`` and
``WEBHOOK_RETRY_*`` (upstream's schedule). Section: ``webhook: {enabled, url, byEvents, base64,
headers, events, signingSecret}``. Targets: the global webhook, and each instance's.
"""

from __future__ import annotations

import functools
import re
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import jwt
from jwt.warnings import InsecureKeyLengthWarning
from pydantic import AliasChoices, BaseModel, Field, field_validator, model_validator
from pydantic_settings import NoDecode

from router.errors import PermanentError, RetryableError
from router.events import Event, by_events_suffix, envelope, strip_message_base64
from router.redact import redact_url
from router.retry import RetryPolicy
from router.sections import Subscription
from router.signing import parse_secrets, signature_headers
from router.sinks import BaseSink, Placement, SinkKind, tcp_reachable
from router.urls import check_http_url

if TYPE_CHECKING:
    from router.instances import InstanceConfig

JWT_HEADER = "jwt_key"
BASE_HEADERS = {"Content-Type": "application/json", "User-Agent": "evolution-router"}
JWT_LIFETIME_S = 600
_RETRY_AFTER_STATUSES = frozenset({429, 503})


def bearer_token(secret: str, now: float | None = None) -> str:
    """The HS256 token that replaces a ``jwt_key`` header (upstream's claims)."""
    iat = int(time.time() if now is None else now)
    claims = {"iat": iat, "exp": iat + JWT_LIFETIME_S, "app": "evolution", "action": "webhook"}
    with warnings.catch_warnings():
        # Upstream accepts any key length; the operator's key is theirs to choose.
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return str(jwt.encode(claims, secret, algorithm="HS256"))


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None if unusable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def request_headers(target: WebhookTarget) -> dict[str, str]:
    """Instance headers verbatim, with ``jwt_key`` turned into a bearer token."""
    if not any(name.lower() == JWT_HEADER for name, _ in target.headers):
        return _static_headers(target)
    headers = dict(BASE_HEADERS)
    for name, value in target.headers:
        if name.lower() == JWT_HEADER:
            headers["Authorization"] = f"Bearer {bearer_token(value)}"
        else:
            headers[name] = value
    return headers


@functools.lru_cache(maxsize=4096)
def _static_headers(target: WebhookTarget) -> dict[str, str]:
    return {**BASE_HEADERS, **dict(target.headers)}


@functools.lru_cache(maxsize=4096)
def _shown(url: str) -> str:
    return redact_url(url)


class WebhookSink(BaseSink):
    name = "webhook"

    def __init__(self, settings: WebhookSettings) -> None:
        self.timeout_s = settings.webhook_request_timeout_ms / 1000
        self.non_retryable = settings.webhook_retry_non_retryable_status_codes
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        # No pool-wide or per-host cap: each target's worker bounds its own connections
        # (ROUTER_WEBHOOK_CONCURRENCY), so targets on one host never queue behind each other.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.timeout_s),
            cookie_jar=aiohttp.DummyCookieJar(),  # a webhook sender keeps no cookies
            auto_decompress=False,  # the answer's body is never looked at
            skip_auto_headers=("User-Agent",),  # ours is in request_headers
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def where(self, target: WebhookTarget, event: Event) -> dict[str, str]:
        return {"url": _shown(target.url_for(event.event))}

    async def check(self, targets: Sequence[WebhookTarget]) -> None:
        """The global webhook's host answers. Instance webhooks are their owners' servers: one
        of them down must not take the router out of a load balancer, so they are not checked."""
        for target in targets:
            if target.instance is None:
                await tcp_reachable(target.url)

    async def send(self, target: WebhookTarget, event: Event) -> int:
        assert self._session is not None, "WebhookSink.send before open"
        data = event.data if target.base64 else strip_message_base64(event.data)
        body = envelope(
            event,
            destination=target.url,
            server_url=event.server_url,
            apikey=event.apikey,
            data=data,
        )
        url = target.url_for(event.event)
        headers = request_headers(target)
        if target.signing_keys:  # Standard Webhooks: signed per attempt (the timestamp changes)
            headers = {**headers, **signature_headers(target.signing_keys, event.id, body)}
        try:
            # Redirects are not followed: a 301/302 would turn the POST into a GET without the
            # event, and that would count as delivered. The failure names where it points.
            async with self._session.post(url, data=body, headers=headers, allow_redirects=False) as response:
                await response.read()
                status = response.status
                retry_after = response.headers.get("Retry-After")
                location = response.headers.get("Location")
        except TimeoutError as exc:
            raise RetryableError(f"timed out after {self.timeout_s:g} s") from exc
        except aiohttp.InvalidURL as exc:
            raise PermanentError(f"invalid URL {_shown(url)!r}") from exc
        except aiohttp.ClientError as exc:
            raise RetryableError(f"{type(exc).__name__}: {exc}") from exc
        except ValueError as exc:  # a header with CR/LF, credentials in the URL and an Authorization header
            raise PermanentError(f"the request cannot be made: {exc}") from exc
        if 200 <= status < 300:
            return status
        if status in self.non_retryable:
            raise PermanentError(f"HTTP {status} (non-retryable)", status=status)
        if 300 <= status < 400:
            raise RetryableError(f"HTTP {status} redirect to {location!r} (not followed)", status=status)
        delay = parse_retry_after(retry_after) if status in _RETRY_AFTER_STATUSES else None
        raise RetryableError(f"HTTP {status}", status=status, retry_after_s=delay)


_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token


class WebhookSettings(BaseModel):
    """Upstream's webhook settings (and ``WEBHOOK_GLOBAL_SIGNING_SECRET``, ours)."""

    webhook_global_enabled: bool = False
    webhook_global_url: str | None = None
    webhook_global_webhook_by_events: bool = False
    webhook_global_signing_secret: str | None = None  # Standard Webhooks, whsec_... (comma: rotation)
    webhook_request_timeout_ms: int = Field(30_000, gt=0)
    webhook_retry_max_attempts: int = Field(10, ge=1)
    webhook_retry_initial_delay_seconds: float = Field(5.0, ge=0)
    webhook_retry_use_exponential_backoff: bool = True
    webhook_retry_max_delay_seconds: float = Field(300.0, ge=0)
    webhook_retry_jitter_factor: float = Field(0.2, ge=0, le=1)
    webhook_retry_non_retryable_status_codes: Annotated[frozenset[int], NoDecode] = frozenset(
        {400, 401, 403, 404, 422}
    )

    @field_validator("webhook_global_url", "webhook_global_signing_secret", mode="before")
    @classmethod
    def _webhook_empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("webhook_global_url")
    @classmethod
    def _webhook_check_url(cls, value: str | None) -> str | None:
        return check_http_url(value) if value is not None else None

    @field_validator("webhook_global_signing_secret")
    @classmethod
    def _webhook_check_signing_secret(cls, value: str | None) -> str | None:
        parse_secrets(value)
        return value

    @field_validator("webhook_retry_non_retryable_status_codes", mode="before")
    @classmethod
    def _webhook_parse_codes(cls, value: Any) -> Any:
        codes = (
            [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value
        )
        if isinstance(codes, list):
            bad = [c for c in codes if not str(c).isdigit() or not 100 <= int(c) <= 599]
            if bad:
                raise ValueError(f"not HTTP status codes: {', '.join(map(str, bad))}")
            return frozenset(int(c) for c in codes)
        return codes

    @model_validator(mode="after")
    def _webhook_global_needs_a_url(self) -> WebhookSettings:
        if self.webhook_global_enabled and not self.webhook_global_url:
            raise ValueError("WEBHOOK_GLOBAL_ENABLED is true but WEBHOOK_GLOBAL_URL is not set")
        return self


class WebhookConfig(Subscription):
    """An instance's ``webhook:`` section (upstream's, with ``signingSecret``)."""

    url: str | None = None
    by_events: bool = Field(
        False, validation_alias=AliasChoices("byEvents", "webhookByEvents", "webhook_by_events", "by_events")
    )
    base64: bool = Field(False, validation_alias=AliasChoices("base64", "webhookBase64", "webhook_base64"))
    headers: dict[str, str] = Field(default_factory=dict)
    # Standard Webhooks signing (ours): one whsec_ secret, or several while changing it.
    signing_secret: tuple[str, ...] = Field(
        (), validation_alias=AliasChoices("signingSecret", "signing_secret")
    )

    @field_validator("signing_secret", mode="before")
    @classmethod
    def _check_signing_secret(cls, value: Any) -> Any:
        parse_secrets(value)
        if value is None or value == "":
            return ()
        return tuple(part.strip() for part in value.split(",")) if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        return check_http_url(value) if value is not None else None

    @field_validator("headers", mode="before")
    @classmethod
    def _stringify_headers(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        headers = {str(k): str(v) for k, v in value.items()}
        for name, text in headers.items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if any(char in text for char in "\r\n\0"):
                raise ValueError(f"header {name!r}: its value must not contain CR, LF or NUL")
        return headers


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """Where and how to POST: the URL (before any by-events suffix) and per-target options."""

    key: str
    instance: str | None  # None for the global webhook
    url: str
    by_events: bool
    base64: bool = True  # False: remove data.message.base64 before sending
    headers: tuple[tuple[str, str], ...] = ()
    events: frozenset[str] = frozenset()
    signing_keys: tuple[bytes, ...] = ()  # Standard Webhooks: one signature per key

    sink = "webhook"

    def url_for(self, wire: str) -> str:
        return with_suffix(self.url, wire) if self.by_events else self.url


@functools.lru_cache(maxsize=65536)
def with_suffix(url: str, wire: str) -> str:
    """``url`` with the by-events suffix appended to its path (a query string stays after it)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + by_events_suffix(wire)))


def global_webhook_key() -> str:
    return "webhook:global"


def instance_webhook_key(instance: str) -> str:
    return f"webhook:instance:{instance}"


class WebhookKind(SinkKind):
    name = "webhook"
    settings = WebhookSettings
    section = WebhookConfig
    event_flags = "WEBHOOK_EVENTS_"

    def enabled(self, settings: WebhookSettings) -> bool:
        return True  # instance webhooks need no switch, as upstream

    def open(self, settings: WebhookSettings) -> WebhookSink:
        return WebhookSink(settings)

    def place(self, settings: Any, instances: Mapping[str, InstanceConfig]) -> Iterable[Placement]:
        if settings.webhook_global_enabled and settings.webhook_global_url:
            yield Placement(
                WebhookTarget(
                    key=global_webhook_key(),
                    instance=None,
                    url=settings.webhook_global_url,
                    by_events=settings.webhook_global_webhook_by_events,
                    events=settings.events_enabled(self.name),
                    signing_keys=parse_secrets(settings.webhook_global_signing_secret),
                )
            )
        for name, config in instances.items():
            hook = config.sections.get(self.name)
            if isinstance(hook, WebhookConfig) and hook.enabled and hook.url:
                target = WebhookTarget(
                    key=instance_webhook_key(name),
                    instance=name,
                    url=hook.url,
                    by_events=hook.by_events,
                    base64=hook.base64,
                    headers=tuple(hook.headers.items()),
                    events=hook.subscribed(),
                    signing_keys=parse_secrets(hook.signing_secret),
                )
                yield Placement(target, name)

    def describe(self, target: WebhookTarget, settings: Any) -> str:
        return redact_url(target.url) + (" (+ /<event> suffix)" if target.by_events else "")

    def warnings(self, settings: Any) -> list[str]:
        if settings.webhook_global_enabled and not settings.events_enabled(self.name):
            return ["the global webhook is enabled but no WEBHOOK_EVENTS_* is true"]
        return []

    def policy(self, settings: Any) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=settings.webhook_retry_max_attempts,
            initial_delay_s=settings.webhook_retry_initial_delay_seconds,
            exponential=settings.webhook_retry_use_exponential_backoff,
            max_delay_s=settings.webhook_retry_max_delay_seconds,
            jitter=settings.webhook_retry_jitter_factor,
        )

    def concurrency(self, settings: Any) -> int:
        return int(settings.router_webhook_concurrency)

    def instance_problems(self, name: str, section: WebhookConfig) -> list[tuple[tuple[str | int, ...], str]]:
        if section.enabled and not section.url:
            return [(("webhook", "enabled"), "webhook is enabled but has no url")]
        return []

    def secrets(self, settings: WebhookSettings) -> list[str | None]:
        values: list[str | None] = list((settings.webhook_global_signing_secret or "").split(","))
        if settings.webhook_global_url:
            values.append(urlsplit(settings.webhook_global_url).password)
        return values

    def section_secrets(self, section: WebhookConfig) -> list[str | None]:
        password = urlsplit(section.url).password if section.url else None
        return [*section.headers.values(), *section.signing_secret, password]

    def row(self, section: WebhookConfig) -> dict[str, Any]:
        return {
            "url": section.url,
            "headers": section.headers or None,
            "webhookByEvents": section.by_events,
            "webhookBase64": section.base64,
        }


KIND = WebhookKind()
