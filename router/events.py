"""Event names and the envelope every sink sends.

Each event has a *wire name* (``messages.upsert``: the payload's ``event`` field), a *config
name* (``MESSAGES_UPSERT``: env vars and ``events:`` lists) and a *by-events suffix*
(``/messages-upsert``: appended to webhook URLs when ``byEvents`` is on).
"""

from __future__ import annotations

import functools
import random
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

WIRE_NAMES: tuple[str, ...] = (
    "application.startup",
    "instance.create",
    "instance.delete",
    "qrcode.updated",
    "connection.update",
    "status.instance",
    "remove.instance",
    "logout.instance",
    "messages.set",
    "messages.upsert",
    "messages.edited",
    "messages.update",
    "messages.delete",
    "send.message",
    "send.message.update",
    "presence.update",
    "chats.set",
    "chats.upsert",
    "chats.update",
    "chats.delete",
    "groups.upsert",
    "groups.update",
    "group-participants.update",
    "call",
    "labels.edit",
    "labels.association",
    "typebot.start",
    "typebot.change-status",
    "contacts.set",
    "contacts.upsert",
    "contacts.update",
)

# What "all events" means for a subscription (``events: []``, a global stream): every event but
# ``application.startup``, which upstream never sends and reaches only those who name it.
STARTUP = "application.startup"
EVERY_EVENT: frozenset[str] = frozenset(WIRE_NAMES) - {STARTUP}

# Upstream's schema lists GROUP_UPDATE but emits GROUPS_UPDATE; both subscribe to groups.update.
ALIASES: dict[str, str] = {"GROUP_UPDATE": "groups.update"}


def config_name(wire: str) -> str:
    """``messages.upsert`` -> ``MESSAGES_UPSERT``."""
    return wire.replace(".", "_").replace("-", "_").upper()


def by_events_suffix(wire: str) -> str:
    """``messages.upsert`` -> ``/messages-upsert`` (webhook by-events path)."""
    return "/" + config_name(wire).lower().replace("_", "-")


CONFIG_TO_WIRE: dict[str, str] = {config_name(w): w for w in WIRE_NAMES} | ALIASES
SUFFIX_TO_WIRE: dict[str, str] = {by_events_suffix(w)[1:]: w for w in WIRE_NAMES} | {
    "group-update": "groups.update"
}
_WIRE_SET = frozenset(WIRE_NAMES)


class UnknownEventError(ValueError):
    """An event name that is neither a wire name, a config name nor an alias."""

    def __init__(self, name: object) -> None:
        super().__init__(f"unknown event {name!r}")
        self.name = name


def wire_name(name: str) -> str:
    """Resolve a wire name, config name or alias to the wire name; raise UnknownEventError."""
    if name in _WIRE_SET:
        return name
    wire = CONFIG_TO_WIRE.get(name.upper()) if isinstance(name, str) else None
    if wire is None:
        raise UnknownEventError(name)
    return wire


def wire_from_suffix(suffix: str) -> str:
    """Resolve a by-events path segment (``messages-upsert``) to the wire name."""
    wire = SUFFIX_TO_WIRE.get(suffix.strip("/").lower())
    if wire is None:
        raise UnknownEventError(suffix)
    return wire


# --- event ids: time-ordered and unique (UUIDv7 layout) ------------------------------------

_id_lock = threading.Lock()
_random = random.Random()  # seeded from os.urandom; ids need uniqueness, not secrecy
_last_ms = 0
_seq = 0
_prefix_ms = -1  # the millisecond whose id text ``_prefix`` is
_prefix = ""


def new_event_id() -> str:
    """A UUIDv7: 48-bit Unix ms, then a counter so ids made in one millisecond still sort.

    Made for every event intake takes: the text of each millisecond is formatted once, and the
    rest from two small numbers, not from a 128-bit one."""
    global _last_ms, _seq, _prefix_ms, _prefix  # noqa: PLW0603 - one process-wide monotonic clock
    with _id_lock:
        now_ms = time.time_ns() // 1_000_000
        if now_ms <= _last_ms:
            _seq += 1
            if _seq > 0xFFF:  # counter exhausted: borrow the next millisecond
                _last_ms += 1
                _seq = 0
            now_ms = _last_ms
        else:
            _last_ms, _seq = now_ms, 0
        seq = _seq
        if now_ms != _prefix_ms:
            _prefix_ms, _prefix = now_ms, f"{now_ms >> 16:08x}-{now_ms & 0xFFFF:04x}-7"
        prefix = _prefix
    rand = _random.getrandbits(62)  # after the variant bits (0b10)
    return f"{prefix}{seq:03x}-{0x8000 | rand >> 48:04x}-{rand & 0xFFFFFFFFFFFF:012x}"


def utc_timestamp(moment: datetime | None = None) -> str:
    """Real UTC with millisecond precision and a ``Z`` suffix: ``2023-12-01T10:30:00.000Z``."""
    if moment is None:
        return _now_timestamp(time.time_ns() // 1_000_000)
    moment = moment.astimezone(UTC)
    # Formatted by hand: strftime writes year 999 as "999", which is not ISO-8601.
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:{moment.minute:02d}:"
        f"{moment.second:02d}.{moment.microsecond // 1000:03d}Z"
    )


@functools.lru_cache(maxsize=4)
def _now_timestamp(unix_ms: int) -> str:
    """Events arrive in bursts: format each millisecond once."""
    return utc_timestamp(datetime.fromtimestamp(unix_ms / 1000, UTC))


@functools.lru_cache(maxsize=1024)  # the events of a burst share their few timestamps
def normalise_timestamp(value: str) -> str:
    """Parse an ISO-8601 timestamp (naive means UTC) and render it as ``utc_timestamp`` does;
    ValueError if it is not one, or if it falls outside years 1 to 9999 once in UTC."""
    moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        return utc_timestamp(moment)
    except OverflowError:
        raise ValueError(f"{value!r} is outside years 1 to 9999 in UTC") from None


# Events, leases and new deliveries are made for every event, so they are not ``frozen``: a
# frozen dataclass's __init__ sets each field through object.__setattr__, five times the cost.
# Treat them as immutable all the same (``unsafe_hash``: hashed and compared by value, as before).
@dataclass(slots=True, unsafe_hash=True)
class Event:
    """One accepted event. ``data`` is kept as the raw JSON bytes it arrived as."""

    id: str
    instance: str
    event: str  # wire name
    data: bytes
    date_time: str
    sender: str | None = None
    server_url: str | None = None
    apikey: str | None = None  # already what the envelope carries
    chat: str | None = None  # the conversation it belongs to (router.ordering.chat_of); not sent
    # The id came from the adapter (so a repeat of it must be recognised); not stored.
    id_from_source: bool = False


def _q(value: str) -> bytes:
    return orjson.dumps(value)


def envelope(
    event: Event,
    *,
    destination: str | None = None,
    server_url: str | None = None,
    apikey: str | None = None,
    data: bytes | None = None,
    extra: dict[str, Any] | None = None,
) -> bytes:
    """The envelope as JSON bytes, keys in the documented order.

    ``data`` is spliced in as stored, so the payload is byte-for-byte what was ingested; pass
    ``data`` to send a changed copy instead (e.g. with base64 media removed).
    """
    parts = [
        b'{"event":',
        _q(event.event),
        b',"instance":',
        _q(event.instance),
        b',"data":',
        event.data if data is None else data,
    ]
    if destination is not None:
        parts += [b',"destination":', _q(destination)]
    parts += [b',"date_time":', _q(event.date_time)]
    if event.sender is not None:
        parts += [b',"sender":', _q(event.sender)]
    if server_url is not None:
        parts += [b',"server_url":', _q(server_url)]
    parts += [b',"apikey":', b"null" if apikey is None else _q(apikey)]
    for key, value in (extra or {}).items():
        parts += [b",", _q(key), b":", orjson.dumps(value)]
    parts += [b',"id":', _q(event.id), b"}"]
    return b"".join(parts)


def strip_message_base64(data: bytes, parents: tuple[str, ...] = ("message",)) -> bytes:
    """``data`` without ``<parent>.base64`` for each of ``parents``; the same bytes when none is there."""
    if b'"base64"' not in data:
        return data
    parsed = orjson.loads(data)
    if not isinstance(parsed, dict):
        return data
    stripped = False
    for parent in parents:
        holder = parsed.get(parent)
        if isinstance(holder, dict) and "base64" in holder:
            del holder["base64"]
            stripped = True
    return orjson.dumps(parsed) if stripped else data
