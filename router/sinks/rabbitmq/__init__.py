"""RabbitMQ: publish the envelope to durable topic exchanges with publisher confirms.

Two topologies (``RABBITMQ_TOPOLOGY``), with the same queue names:

- ``router`` (the default, as the seed documents): one exchange, ``RABBITMQ_EXCHANGE_NAME``,
  routing key ``{instance}.{event}``. Queue ``{instance}.{event}`` is bound with that key for an
  instance that subscribed; ``{RABBITMQ_PREFIX_KEY}.{event}`` (or ``{event}``) with
  ``#.{event}`` for the global subscription (``#``, so dotted instance names match too; no
  event name ends with the words of another, so the binding catches that event only).
- ``upstream`` (Evolution API 2.3.6): an instance's events go to an exchange named after the
  instance with routing key ``{event}``, its queue ``{instance}.{event}`` bound with ``{event}``;
  global events go to ``RABBITMQ_EXCHANGE_NAME`` with routing key ``{event}``, queue
  ``{prefix}.{event}`` (or ``{event}``) bound with ``{event}``. An event for both is two publishes
  (two targets), as upstream makes them.

Before the first publish of an event, the queues that should receive it are declared (quorum,
durable) and bound, so nothing published is lost while no consumer exists yet; on channels kept
for declaring (``declarations``), so that no publish waits behind a declaration.

One connection, kept by one task: opened at start and again whenever it is lost, with the queue
retry backoff (``ROUTER_QUEUE_RETRY_*``), for as long as it takes. While it is down the sink is
not ``ready``: workers wait for it, and no attempt is made or counted (no storm of connection
attempts, no error row per delivery); events wait in the store.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from router.sections import Subscription
from router.sinks import Configured, Placement, SinkKind, subscribed
from router.sinks.rabbitmq.client import RabbitmqSink
from router.sinks.rabbitmq.config import RabbitmqSettings, RabbitmqTarget, topic_safe

__all__ = ["KIND", "RabbitmqSettings", "RabbitmqSink", "RabbitmqTarget", "topic_safe"]

GLOBAL_KEY = "rabbitmq:global"
NOT_TOPIC_SAFE = "a word '*' or '#' between dots is a wildcard in its binding keys"


class RabbitmqKind(SinkKind):
    """In the router's topology global and instance queues hang off one exchange and one routing
    key, so one publish reaches both: an instance with RabbitMQ on has one target that declares
    its own queues and the global ones (it ``covers`` the global target for that instance). In
    upstream's, the instance's exchange is its own, so its target and the global one are apart."""

    name = "rabbitmq"
    settings = RabbitmqSettings
    section = Subscription
    event_flags = "RABBITMQ_EVENTS_"

    def enabled(self, settings: RabbitmqSettings) -> bool:
        return settings.rabbitmq_enabled

    def open(self, settings: Any) -> RabbitmqSink:
        return RabbitmqSink(settings)

    def place(self, settings: Any, instances: Mapping[str, Configured]) -> Iterable[Placement]:
        shared = settings.rabbitmq_topology == "router"
        everyone = frozenset[str]()
        if settings.rabbitmq_global_enabled:
            everyone = settings.events_enabled(self.name)
            yield Placement(RabbitmqTarget(GLOBAL_KEY, None, frozenset(), everyone))
        for name, own in subscribed(self.name, instances):
            target = RabbitmqTarget(
                f"rabbitmq:instance:{name}", name, own.subscribed(), everyone if shared else frozenset()
            )
            yield Placement(target, name, covers=GLOBAL_KEY if shared else None)

    def describe(self, target: RabbitmqTarget, settings: Any) -> str:
        if settings.rabbitmq_topology == "upstream":
            return f"exchange {target.instance or settings.rabbitmq_exchange_name}, key <event>"
        return f"exchange {settings.rabbitmq_exchange_name}, key <instance>.<event>"

    def layout(self, settings: Any) -> str:
        exchange = settings.rabbitmq_exchange_name
        if settings.rabbitmq_topology == "upstream":
            return (
                "rabbitmq topology: upstream (Evolution API 2.3.6's: an exchange per instance with routing"
                f" key <event>, global events to {exchange!r} with routing key <event>)"
            )
        return f"rabbitmq topology: router (one exchange {exchange!r}, routing key <instance>.<event>)"

    def instance_problems(self, name: str, section: Subscription) -> list[tuple[tuple[str | int, ...], str]]:
        if section.enabled and not topic_safe(name):
            return [(("instanceName",), f"{name!r} cannot be used with RabbitMQ: {NOT_TOPIC_SAFE}")]
        return []

    def refuses_instance(self, settings: Any, name: str) -> str | None:
        routes_every_instance = settings.rabbitmq_global_enabled and settings.rabbitmq_topology == "router"
        if routes_every_instance and not topic_safe(name):
            return f"instance name {name!r} cannot be routed by RabbitMQ: {NOT_TOPIC_SAFE}"
        return None

    def secrets(self, settings: RabbitmqSettings) -> list[str | None]:
        return [urlsplit(settings.rabbitmq_uri).password] if settings.rabbitmq_uri else []


KIND = RabbitmqKind()
