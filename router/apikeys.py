"""API keys: the one way a given key is compared with an expected one."""

from __future__ import annotations

import hmac


def key_matches(given: str, expected: str | None) -> bool:
    """Constant-time comparison; bytes, so a key outside ASCII is simply not a match."""
    return expected is not None and hmac.compare_digest(given.encode(), expected.encode())
