"""Where events go. A sink opens, makes one delivery attempt per ``send`` and closes::

    async with WebhookSink(settings) as sink:
        await sink.send(target, event)   # returns, or raises RetryableError / PermanentError

Sinks never sleep or retry: the delivery worker owns the only retry loop.

Everything the daemon knows of a sink is declared once, in the sink's module, by a ``SinkKind``:
its name, its settings, its per-instance section, how its targets are placed, its retry policy
and concurrency, how ``check`` describes it, the rules it puts on instances, its secrets.
``router.sinks.registry.SINKS`` lists them; every other module iterates that list. Adding a
sink is one module here, one line there, an example, a test module and a README section.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self
from urllib.parse import urlsplit

from router.errors import RetryableError
from router.events import Event
from router.retry import RetryPolicy
from router.sections import Subscription

if TYPE_CHECKING:
    from pydantic import BaseModel


class Configured(Protocol):
    """An instance's configuration as sinks read it (``router.instances.InstanceConfig``)."""

    @property
    def sections(self) -> Mapping[str, Subscription]:
        """Each sink's section of the instance file, by sink name."""


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
    connected: bool | None = None  # for sinks with a connection of their own: is it open

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

    def shares(self, target: Any) -> tuple[Hashable, int] | None:
        """The place ``target``'s attempts share with other targets', and how many attempts it
        takes at once (``router.lanes``); None: each target has its own."""
        return None

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


class Target(Protocol):
    """One place deliveries go. ``key`` names it in the durable queue (``<sink>:...``)."""

    @property
    def key(self) -> str: ...

    @property
    def instance(self) -> str | None: ...  # None: a global target

    @property
    def events(self) -> frozenset[str]: ...


@dataclass(frozen=True, slots=True)
class Placement:
    """A target and whose events it takes: one instance's, or (``instance`` None) every instance's.
    ``covers``: for this instance, the key of a global target whose delivery this one makes too
    (one RabbitMQ publish reaches the instance's and the global queues)."""

    target: Any
    instance: str | None = None
    covers: str | None = None


def subscribed(name: str, instances: Mapping[str, Configured]) -> Iterable[tuple[str, Any]]:
    """(instance, its section) for every instance whose ``name`` section is enabled."""
    for instance, config in instances.items():
        section = config.sections.get(name)
        if section is not None and section.enabled:
            yield instance, section


class SinkKind:
    """A sink's declaration; each sink module defines one subclass and ``KIND = ThatKind()``."""

    name: ClassVar[str]  # target keys start with it; metrics labels; ``dlq --sink``
    settings: ClassVar[type[BaseModel]]  # its settings (upstream's names), merged into ``Settings``
    section: ClassVar[type[Subscription] | None] = None  # the instance file's ``<name>:`` section
    event_flags: ClassVar[str | None] = None  # prefix of the global per-event switches
    # ``check`` runs the sink's own check too: it proves configuration (credentials), not only
    # that a server is up right now (that is /ready's business).
    checked_by_cli: ClassVar[bool] = False
    # Upstream settings under its event-flag prefix that are not events: accepted, not used.
    ignored_settings: ClassVar[frozenset[str]] = frozenset()
    # ``ROUTER_<NAME>_ORDERING`` when unset: which deliveries go one at a time (router.ordering).
    default_ordering: ClassVar[str] = "chat"

    def enabled(self, settings: Any) -> bool:
        """The sink is switched on (``<NAME>_ENABLED``)."""
        raise NotImplementedError

    def open(self, settings: Any) -> BaseSink:
        """The sink, not yet opened."""
        raise NotImplementedError

    def place(self, settings: Any, instances: Mapping[str, Configured]) -> Iterable[Placement]:
        """Its targets, global and per instance, for this configuration."""
        raise NotImplementedError

    def describe(self, target: Any, settings: Any) -> str:
        """Where ``target`` delivers, for ``check``."""
        raise NotImplementedError

    def policy(self, settings: Any) -> RetryPolicy:
        return RetryPolicy.for_queues(
            settings.router_queue_retry_initial_delay_s, settings.router_queue_retry_max_delay_s
        )

    def concurrency(self, settings: Any) -> int:
        return int(settings.router_queue_concurrency)

    def layout(self, settings: Any) -> str | None:
        """One line for ``check`` when the sink has more than one layout; None otherwise."""
        return None

    def warnings(self, settings: Any) -> list[str]:
        """Settings that are valid but probably not what was meant, for ``check``."""
        return []

    def instance_problems(self, name: str, section: Any) -> list[tuple[tuple[str | int, ...], str]]:
        """What is wrong with instance ``name``'s section beyond its own validation."""
        return []

    def refuses_instance(self, settings: Any, name: str) -> str | None:
        """Why events of instance ``name`` cannot be routed by the global target; None if they can."""
        return None

    def secrets(self, settings: Any) -> list[str | None]:
        return []

    def section_secrets(self, section: Any) -> list[str | None]:
        return []

    def row(self, section: Any) -> dict[str, Any]:
        """The fields of the sink's own in upstream's row for ``find`` and ``fetchInstances``."""
        return {}
