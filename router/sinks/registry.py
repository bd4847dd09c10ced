"""The sinks the router has: one line each. Every other module iterates ``SINKS``.

The WebSocket hub is not here: it streams live from intake, without targets or the store.
"""

from __future__ import annotations

from typing import Any

from router.sinks import BaseSink, SinkKind, nats, pusher, rabbitmq, sqs, webhook

SINKS: tuple[SinkKind, ...] = (webhook.KIND, rabbitmq.KIND, sqs.KIND, pusher.KIND, nats.KIND)
BY_NAME: dict[str, SinkKind] = {kind.name: kind for kind in SINKS}
SECTIONS: dict[str, SinkKind] = {kind.name: kind for kind in SINKS if kind.section is not None}


def kind_of(target_key: str) -> SinkKind | None:
    """The kind a stored target key belongs to (``webhook:instance:bot`` -> webhook)."""
    return BY_NAME.get(target_key.split(":", 1)[0])


def build_sinks(settings: Any) -> dict[str, BaseSink]:
    """One (unopened) sink of every kind that is enabled, by name."""
    return {kind.name: kind.open(settings) for kind in SINKS if kind.enabled(settings)}
