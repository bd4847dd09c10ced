"""Standard Webhooks signatures (https://www.standardwebhooks.com), as Svix and Hookdeck send them.

A webhook with a signing secret gets three headers on every request::

    webhook-id: <the event id, the same on every retry>
    webhook-timestamp: <unix seconds of this attempt>
    webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body"> [v1,<...> ...]

Secrets are written ``whsec_<base64>``. During a change of secret both are configured (a list,
or comma-separated), and every request carries a signature made with each, so receivers can
switch at their own pace.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Sequence
from typing import Any

PREFIX = "whsec_"
MIN_KEY_BYTES = 16


def parse_secrets(value: Any) -> tuple[bytes, ...]:
    """``"whsec_..."``, ``"whsec_a,whsec_b"`` or a list of them -> the keys; ValueError naming
    what is wrong (never the secret itself)."""
    if value is None or value == "":
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError("must be a whsec_ secret, or a list of them")  # noqa: TRY004 - pydantic wants ValueError
    keys = []
    for index, item in enumerate(items):
        text = str(item).strip()
        if not text.startswith(PREFIX):
            raise ValueError(f"secret {index + 1} must start with {PREFIX!r}")
        try:
            key = base64.b64decode(text.removeprefix(PREFIX), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"secret {index + 1} is not base64 after {PREFIX!r}") from None
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"secret {index + 1} is {len(key)} bytes; at least {MIN_KEY_BYTES} are needed")
        keys.append(key)
    return tuple(keys)


def signature_headers(
    keys: Sequence[bytes], message_id: str, body: bytes, now: float | None = None
) -> dict[str, str]:
    """The three headers for one request of ``body`` (empty when there is no key)."""
    if not keys:
        return {}
    timestamp = str(int(time.time() if now is None else now))
    signed = f"{message_id}.{timestamp}.".encode() + body
    signatures = " ".join(
        "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode() for key in keys
    )
    return {"webhook-id": message_id, "webhook-timestamp": timestamp, "webhook-signature": signatures}
