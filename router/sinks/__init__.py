"""Where events go. A sink opens, makes one delivery attempt per ``send`` and closes::

    async with WebhookSink(settings) as sink:
        await sink.send(target, event)   # returns, or raises RetryableError / PermanentError

Sinks never sleep or retry: the delivery worker owns the only retry loop. Adding a sink is one
module here, one entry in ``SINKS``, one example and one test module.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Protocol, Self

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


class BaseSink:
    """``async with`` support for sinks."""

    name = "sink"

    async def open(self) -> None:
        return None

    async def send(self, target: Any, event: Event) -> int | None:
        raise NotImplementedError

    async def aclose(self) -> None:
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
