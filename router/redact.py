"""Secrets out of log lines, error messages and command output: one rule, used everywhere.

A URL keeps its scheme, host, port and path; the password of its user info and the values of
its query become ``***`` (``https://bot:***@host/hook?token=***``). ``redact_text`` does the same
to every URL inside free text (a library's error message), and ``Secrets`` blanks out known
secret values (API keys, tokens) wherever they appear.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import SplitResult, urlsplit, urlunsplit

MASK = "***"
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """``url`` without its password and query values."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{MASK}@{host}" if ":" in userinfo else f"{MASK}@{host}"
    query = parts.query
    if query:
        query = "&".join(
            f"{pair.split('=', 1)[0]}={MASK}" if "=" in pair else MASK for pair in query.split("&")
        )
    return urlunsplit(SplitResult(parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URL in ``text`` redacted (cheap when there is none)."""
    if "://" not in text:
        return text
    return _URL.sub(lambda match: redact_url(match.group(0)), text)


class Secrets:
    """Known secret values, blanked out of any text."""

    def __init__(self, values: Iterable[str | None] = ()) -> None:
        # Longest first, so a secret containing another is blanked whole; short ones would blank
        # ordinary words, and a key of under 4 characters protects nothing anyway.
        self.values = sorted({value for value in values if value and len(value) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for value in self.values:
            if value in text:
                text = text.replace(value, MASK)
        return text
