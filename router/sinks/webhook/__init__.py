"""HTTP webhooks: POST the envelope as JSON over pooled keep-alive connections.

Settings: ``WEBHOOK_GLOBAL_*``, ``WEBHOOK_EVENTS_<EVENT>``, ``WEBHOOK_REQUEST_TIMEOUT_MS`` and
``WEBHOOK_RETRY_*`` (upstream's schedule). Section: ``webhook: {enabled, url, byEvents, base64,
headers, events, signingSecret}``. Targets: the global webhook, and each instance's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from router.redact import redact_url
from router.retry import RetryPolicy
from router.signing import parse_secrets
from router.sinks import Configured, Placement, SinkKind
from router.sinks.webhook.client import WebhookSink, bearer_token, parse_retry_after, request_headers
from router.sinks.webhook.config import (
    WebhookConfig,
    WebhookSettings,
    WebhookTarget,
    global_webhook_key,
    instance_webhook_key,
)

__all__ = [
    "KIND",
    "WebhookConfig",
    "WebhookSettings",
    "WebhookSink",
    "WebhookTarget",
    "bearer_token",
    "parse_retry_after",
    "request_headers",
]


class WebhookKind(SinkKind):
    name = "webhook"
    settings = WebhookSettings
    section = WebhookConfig
    event_flags = "WEBHOOK_EVENTS_"
    ignored_settings = frozenset({"WEBHOOK_EVENTS_ERRORS", "WEBHOOK_EVENTS_ERRORS_WEBHOOK"})

    def enabled(self, settings: WebhookSettings) -> bool:
        return True  # instance webhooks need no switch, as upstream

    def open(self, settings: WebhookSettings) -> WebhookSink:
        return WebhookSink(settings)

    def place(self, settings: Any, instances: Mapping[str, Configured]) -> Iterable[Placement]:
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
