"""structlog setup. ``LOG_LEVEL`` is upstream's comma list of independent switches:

ERROR, WARN, INFO, DEBUG follow the method used (``log.error`` ...); ``WEBHOOKS`` (one line per
delivery attempt to webhook, RabbitMQ, SQS and Pusher), ``WEBSOCKET``, ``LOG``, ``VERBOSE`` and
``DARK`` are chosen with ``kind=``: ``log.info("delivery.attempt", kind="WEBHOOKS", ...)``.
The message goes out as ``msg``; pass the event name as ``_event=`` and it goes out as ``event``.
Hot paths ask ``is_enabled("WEBHOOKS")`` first, so a switched-off line costs nothing.

Every line passes ``router.redact`` last: URLs lose passwords and query values, and the secrets
the daemon knows (``set_secrets``: the API key, instance tokens, broker and app credentials) are
blanked out, whatever field or traceback they turn up in.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import orjson
import structlog

from router.redact import Secrets, redact_text

_METHOD_KIND = {
    "critical": "ERROR",
    "exception": "ERROR",
    "error": "ERROR",
    "warning": "WARN",
    "warn": "WARN",
    "info": "INFO",
    "debug": "DEBUG",
}
_enabled: frozenset[str] = frozenset({"ERROR", "WARN", "INFO", "LOG"})
_secrets = Secrets()


def set_secrets(values: Iterable[str | None]) -> None:
    """The secret values no log line may show (replaced whole at every reload)."""
    global _secrets  # noqa: PLW0603 - logging is process-wide by nature
    _secrets = Secrets(values)


def scrub(text: str) -> str:
    """``text`` fit for a log line or an error message: no URL credentials, no known secret."""
    return _secrets(redact_text(text))


def _redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event_dict.items():
        if isinstance(value, str):
            event_dict[key] = scrub(value)
        elif isinstance(value, list | tuple):
            event_dict[key] = [scrub(item) if isinstance(item, str) else item for item in value]
    return event_dict


def is_enabled(kind: str) -> bool:
    return kind in _enabled


def _filter(_: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    kind = event_dict.pop("kind", None) or _METHOD_KIND.get(method, "INFO")
    if kind not in _enabled:
        raise structlog.DropEvent
    if kind not in _METHOD_KIND.values():
        event_dict["kind"] = kind
    return event_dict


def _orjson_dumps(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=str).decode()


def configure(levels: Iterable[str], fmt: str = "console", color: bool = True) -> None:
    """Set up structlog once, at start-up, from the settings."""
    global _enabled  # noqa: PLW0603 - logging is process-wide by nature
    _enabled = frozenset(level.upper() for level in levels)
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=color and sys.stderr.isatty(), event_key="msg", sort_keys=False
        )
    structlog.configure(
        processors=[
            _filter,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,  # a traceback is text that _redact reads too
            _redact,
            structlog.processors.EventRenamer(to="msg", replace_by="_event"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    root.handlers = [_StdlibToStructlog()]
    root.setLevel(logging.WARNING)


class _StdlibToStructlog(logging.Handler):
    """Client libraries (aiohttp, aiobotocore) log through ``logging``: same format, same switches."""

    _methods = {logging.ERROR: "error", logging.WARNING: "warning", logging.INFO: "info"}

    def emit(self, record: logging.LogRecord) -> None:
        method = self._methods.get(record.levelno, "debug" if record.levelno < logging.INFO else "error")
        # exc_info: aiohttp's "Error handling request" says what failed only in its traceback.
        getattr(structlog.get_logger(record.name), method)(
            record.getMessage(), library=record.name, exc_info=record.exc_info or False
        )


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
