"""API keys: how a request carries one, and the one way it is compared with an expected one."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import unquote


def key_matches(given: str, expected: str | None) -> bool:
    """Constant-time comparison of the UTF-8 bytes; a key that is not text simply does not match."""
    if expected is None:
        return False
    # surrogatepass: a header that was not UTF-8 reaches us with lone surrogates; it must not raise.
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def key_digest(key: str) -> bytes:
    """What a set of keys holds instead of the keys: one lookup finds a key among thousands, and
    the time it takes tells nothing of the keys that are near it."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def request_keys(headers: Mapping[str, str]) -> list[str]:
    """The keys a request offers: its ``apikey`` header, and the password of HTTP Basic credentials.

    Upstream's global webhook sends no headers of its own, so the only credential it can carry is
    in its URL (``http://evolution:KEY@router:8080/ingest``), which HTTP clients send as
    ``Authorization: Basic``; the user name is not looked at. A password that was percent-encoded
    in the URL is tried as written and decoded.
    """
    keys = []
    if apikey := headers.get("apikey"):
        keys.append(apikey)
    scheme, _, credentials = headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "basic" and credentials:
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return keys
        _, colon, password = decoded.partition(":")
        if colon and password:
            keys.append(password)
            if (unquoted := unquote(password)) != password:
                keys.append(unquoted)
    return keys
