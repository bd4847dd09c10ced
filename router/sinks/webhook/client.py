"""The webhook client: one POST per attempt, signed and with its headers, classified."""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Hashable, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

from router.errors import PermanentError, RetryableError
from router.events import Event, envelope, strip_message_base64
from router.redact import redact_url
from router.signing import signature_headers
from router.sinks import BaseSink, tcp_reachable
from router.sinks.webhook.config import WebhookSettings, WebhookTarget
from router.sinks.webhook.http import HttpClient, InvalidURL, origin_of
from router.sinks.webhook.http_connection import ProtocolError

JWT_HEADER = "jwt_key"
BASE_HEADERS = {"Content-Type": "application/json", "User-Agent": "evolution-router"}
JWT_LIFETIME_S = 600
_RETRY_AFTER_STATUSES = frozenset({429, 503})


def bearer_token(secret: str, now: float | None = None) -> str:
    """The HS256 token that replaces a ``jwt_key`` header (upstream's claims)."""
    iat = int(time.time() if now is None else now)
    claims = {"iat": iat, "exp": iat + JWT_LIFETIME_S, "app": "evolution", "action": "webhook"}
    import jwt  # noqa: PLC0415 - with its cryptography, a tenth of a start: only once a jwt_key is used
    from jwt.warnings import InsecureKeyLengthWarning  # noqa: PLC0415

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


def request_headers(target: WebhookTarget) -> tuple[tuple[str, str], ...]:
    """Instance headers verbatim, with ``jwt_key`` turned into a bearer token."""
    if not any(name.lower() == JWT_HEADER for name, _ in target.headers):
        return _static_headers(target.headers)
    headers = dict(BASE_HEADERS)
    for name, value in target.headers:
        if name.lower() == JWT_HEADER:
            headers["Authorization"] = f"Bearer {bearer_token(value)}"
        else:
            headers[name] = value
    return tuple(headers.items())


@functools.lru_cache(maxsize=4096)  # by the headers, not the target: most instances share theirs
def _static_headers(headers: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple({**BASE_HEADERS, **dict(headers)}.items())


@functools.lru_cache(maxsize=4096)
def _shown(url: str) -> str:
    return redact_url(url)


class WebhookSink(BaseSink):
    name = "webhook"

    def __init__(self, settings: WebhookSettings) -> None:
        self.timeout_s = settings.webhook_request_timeout_ms / 1000
        self.non_retryable = settings.webhook_retry_non_retryable_status_codes
        self.host_limit = settings.router_webhook_host_concurrency
        self._client: HttpClient | None = None

    async def open(self) -> None:
        self._client = HttpClient()

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    def where(self, target: WebhookTarget, event: Event) -> dict[str, str]:
        return {"url": _shown(target.url_for(event.event))}

    def shares(self, target: WebhookTarget) -> tuple[Hashable, int] | None:
        """Each target bounds its own attempts (ROUTER_WEBHOOK_CONCURRENCY); the targets on one
        host share ROUTER_WEBHOOK_HOST_CONCURRENCY, in turn, slow ones excepted."""
        try:
            return origin_of(target.url), self.host_limit
        except InvalidURL:
            return None  # its attempts fail at once, each on its own

    async def check(self, targets: Sequence[WebhookTarget]) -> None:
        """The global webhook's host answers. Instance webhooks are their owners' servers: one
        of them down must not take the router out of a load balancer, so they are not checked."""
        for target in targets:
            if target.instance is None:
                await tcp_reachable(target.url)

    async def send(self, target: WebhookTarget, event: Event) -> int:
        assert self._client is not None, "WebhookSink.send before open"
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
            headers = (*headers, *signature_headers(target.signing_keys, event.id, body).items())
        try:
            # Redirects are not followed: a 301/302 would turn the POST into a GET without the
            # event, and that would count as delivered. The failure names where it points.
            response = await self._client.post(url, body, headers, self.timeout_s)
        except TimeoutError as exc:
            raise RetryableError(f"timed out after {self.timeout_s:g} s") from exc
        except InvalidURL as exc:
            raise PermanentError(f"invalid URL {_shown(url)!r}") from exc
        except ProtocolError as exc:
            raise RetryableError(str(exc)) from exc
        except OSError as exc:
            where = urlsplit(url)
            raise RetryableError(
                f"cannot connect to {where.hostname}:{where.port or where.scheme}: {exc}"
            ) from exc
        except ValueError as exc:  # a header with CR/LF, credentials in the URL and an Authorization header
            raise PermanentError(f"the request cannot be made: {exc}") from exc
        status = response.status
        retry_after = response.headers.get("retry-after")
        location = response.headers.get("location")
        if 200 <= status < 300:
            return status
        if status in self.non_retryable:
            raise PermanentError(f"HTTP {status} (non-retryable)", status=status)
        if 300 <= status < 400:
            raise RetryableError(f"HTTP {status} redirect to {location!r} (not followed)", status=status)
        delay = parse_retry_after(retry_after) if status in _RETRY_AFTER_STATUSES else None
        raise RetryableError(f"HTTP {status}", status=status, retry_after_s=delay)
