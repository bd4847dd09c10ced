"""NATS: publish the envelope to upstream's subjects, acknowledged, from the durable queue.

Settings (upstream's): ``NATS_ENABLED``, ``NATS_URI``, ``NATS_GLOBAL_ENABLED``,
``NATS_PREFIX_KEY``, ``NATS_EVENTS_<EVENT>`` (``NATS_EXCHANGE_NAME`` is accepted and unused, as
upstream's NATS has no exchanges). Section: ``nats: {enabled, events}``.

Subjects as upstream: ``{instance}.{event}`` for an instance that subscribed, and
``{NATS_PREFIX_KEY}.{event}`` (or ``{event}``) for the global subscription; two targets, so an
event for both is two publishes, as upstream makes them. The body is the envelope (no
``destination``), with the header ``Nats-Msg-Id`` = the event id, so a JetStream stream that
captures the subject stores a retried publish once.

Upstream publishes and forgets. Here a publish is done only once the server has answered for
it: when a JetStream stream captures the subject (asked of JetStream, and remembered for
``STREAM_CACHE_S``), JetStream's publish acknowledgement; otherwise a core publish followed by a
flush, the server's answer to a ping sent after it, so it has taken the message for the
subscribers there are. No answer in time is a failed attempt, retried from the store.

One connection, kept by one task: opened with the queue retry backoff for as long as it takes;
while it is down (nats-py reconnecting) the sink is not ``ready`` and workers wait without
making or counting attempts.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from router.sections import Subscription
from router.sinks import BaseSink, Configured, Placement, SinkKind, subscribed
from router.sinks.nats.config import NatsSettings, NatsTarget, subject

__all__ = ["KIND", "NatsSettings", "NatsTarget", "subject"]


class NatsKind(SinkKind):
    name = "nats"
    settings = NatsSettings
    section = Subscription
    event_flags = "NATS_EVENTS_"

    def enabled(self, settings: NatsSettings) -> bool:
        return settings.nats_enabled

    def open(self, settings: NatsSettings) -> BaseSink:
        from router.sinks.nats.client import NatsSink  # noqa: PLC0415 - nats-py only when NATS is on

        return NatsSink(settings)

    def place(self, settings: Any, instances: Mapping[str, Configured]) -> Iterable[Placement]:
        if settings.nats_global_enabled:
            yield Placement(NatsTarget("nats:global", None, settings.events_enabled(self.name)))
        for name, own in subscribed(self.name, instances):
            yield Placement(NatsTarget(f"nats:instance:{name}", name, own.subscribed()), name)

    def describe(self, target: NatsTarget, settings: NatsSettings) -> str:
        if target.instance is not None:
            return f"subjects {target.instance}.<event>"
        prefix = settings.nats_prefix_key
        return f"subjects {prefix}.<event>" if prefix else "subjects <event>"

    def secrets(self, settings: NatsSettings) -> list[str | None]:
        return [urlsplit(server).password for server in (settings.nats_uri or "").split(",")]


KIND = NatsKind()
