"""The webhook's settings, its instance section and its target."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, BaseModel, Field, field_validator, model_validator
from pydantic_settings import NoDecode

from router.events import by_events_suffix
from router.sections import Subscription
from router.signing import parse_secrets
from router.urls import check_http_url

HOST_LIMIT = 64  # attempts at once to one host, shared by its targets (router.lanes), by default
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 token


class WebhookSettings(BaseModel):
    """Upstream's webhook settings (and ``WEBHOOK_GLOBAL_SIGNING_SECRET``, ours)."""

    webhook_global_enabled: bool = False
    webhook_global_url: str | None = None
    webhook_global_webhook_by_events: bool = False
    webhook_global_signing_secret: str | None = None  # Standard Webhooks, whsec_... (comma: rotation)
    webhook_request_timeout_ms: int = Field(30_000, gt=0)
    router_webhook_concurrency: int = Field(64, ge=1)  # ours: attempts at once per webhook target
    router_webhook_host_concurrency: int = Field(HOST_LIMIT, ge=1)  # ours: attempts at once per host, shared
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
