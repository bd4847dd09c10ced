"""The one rule for the http(s) URLs a configuration gives (webhooks, the global webhook)."""

from __future__ import annotations

from urllib.parse import urlsplit

from router.redact import redact_url


def check_http_url(value: str) -> str:
    """``value`` if it is an http:// or https:// URL with a host; ValueError (credentials hidden)."""
    try:
        parts = urlsplit(value)
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or " " in value:
        raise ValueError(f"must be an http:// or https:// URL, got {redact_url(value)!r}")
    return value
