"""SQS queue names and message group ids (see ``router.sinks.sqs``)."""

from __future__ import annotations

import hashlib
import re

from router.events import by_events_suffix

MAX_NAME = 80
_ILLEGAL = re.compile(r"[^A-Za-z0-9_-]")


def queue_name(base: str, wire: str | None, fifo: bool) -> str:
    """``base-event`` (by-events form) made legal."""
    return legal_queue_name(f"{base}{by_events_suffix(wire).replace('/', '-')}" if wire else base, fifo)


def upstream_queue_name(base: str, part: str, fifo: bool) -> str:
    """Upstream's ``base_part``: ``part`` is the event's config name in lower case, or ``singlequeue``."""
    return legal_queue_name(f"{base}_{part}", fifo)


def legal_queue_name(name: str, fifo: bool) -> str:
    """``name`` made legal for SQS; too long a name keeps a hash of the full one, to stay unique."""
    name = _ILLEGAL.sub("-", name)
    suffix = ".fifo" if fifo else ""
    limit = MAX_NAME - len(suffix)
    if len(name) > limit:
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]  # a name, not a secret
        name = f"{name[: limit - 9]}-{digest}"
    return name + suffix


_GROUP_ID = re.compile(r"[!-~]{1,128}")  # what SQS takes: 1 to 128 printable ASCII characters


def group_id(key: str) -> str:
    """``key`` as a ``MessageGroupId``: itself when SQS takes it, else a digest of it."""
    if _GROUP_ID.fullmatch(key):
        return key
    return "sha256-" + hashlib.sha256(key.encode()).hexdigest()
