"""Where events go. A sink opens, makes one delivery attempt per ``send`` and closes::

    async with WebhookSink(settings) as sink:
        await sink.send(target, event)   # returns, or raises RetryableError / PermanentError

Sinks never sleep or retry: the delivery worker owns the only retry loop. Adding a sink is one
module here, one entry in ``SINKS``, one example and one test module.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Protocol, Self
from urllib.parse import urlsplit

from router.errors import RetryableError
from router.events import Event
from router.settings import Settings


class Sink(Protocol):
    """The interface every sink implements."""

    name: str

    async def open(self) -> None:
        """Acquire connections and clients; called once before the first ``send``."""

    async def send(self, target: Any, event: Event) -> int | None:
        """Make one delivery attempt of ``event`` to ``target``.

        Returns when the receiver has it, with its status code if the protocol has one.
        Raises ``RetryableError`` (try again later, possibly with ``retry_after_s``) or
        ``PermanentError`` (dead letter now).
        """

    async def aclose(self) -> None:
        """Release everything ``open`` acquired."""

    async def check(self, targets: Sequence[Any]) -> None:
        """Whether deliveries to ``targets`` can be made now (at start, and for ``GET /ready``).

        Returns, or raises ``RetryableError`` (unreachable) or ``PermanentError`` (refused).
        """

    ready: bool
    """False while the sink can make no attempt at all (``send`` would raise ``Unavailable``)."""

    async def wait_ready(self) -> None:
        """Return once ``ready``: workers wait here instead of failing attempt after attempt."""


async def tcp_reachable(url: str, timeout_s: float = 3.0) -> None:
    """Open and close a TCP connection to ``url``'s host and port; RetryableError if that fails."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    where = f"{parts.hostname}:{port}"
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(parts.hostname, port), timeout_s)
    except TimeoutError as exc:
        raise RetryableError(f"{where} unreachable: no answer within {timeout_s:g} s") from exc
    except OSError as exc:
        raise RetryableError(f"{where} unreachable: {exc.strerror or exc}") from exc
    writer.close()
    await writer.wait_closed()


class BaseSink:
    """``async with`` support for sinks."""

    name = "sink"
    ready = True

    async def wait_ready(self) -> None:
        return None

    async def open(self) -> None:
        return None

    async def send(self, target: Any, event: Event) -> int | None:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None

    async def check(self, targets: Sequence[Any]) -> None:
        return None

    def where(self, target: Any, event: Event) -> dict[str, str]:
        """Where an attempt of ``event`` goes, as log fields (``url``, ``queue`` ...)."""
        return {}

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def build_sinks(settings: Settings) -> dict[str, BaseSink]:
    """One instance of every sink, by name (``webhook`` ...)."""
    from router.sinks.pusher import PusherSink  # noqa: PLC0415 - keeps the registry one place
    from router.sinks.rabbitmq import RabbitmqSink  # noqa: PLC0415
    from router.sinks.sqs import SqsSink  # noqa: PLC0415
    from router.sinks.webhook import WebhookSink  # noqa: PLC0415

    sinks: dict[str, BaseSink] = {"webhook": WebhookSink(settings)}
    if settings.rabbitmq_enabled:
        sinks["rabbitmq"] = RabbitmqSink(settings)
    if settings.sqs_enabled:
        sinks["sqs"] = SqsSink(settings)
    if settings.pusher_enabled:
        sinks["pusher"] = PusherSink(settings)
    return sinks
