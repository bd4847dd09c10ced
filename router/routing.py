"""(instance, event) -> the targets that receive it, from an index built once per configuration.

A *target* is one place deliveries go: the global webhook, or one instance's webhook. Its
``key`` names it in the durable queue (``webhook:global``, ``webhook:instance:<name>``), so
stored deliveries survive restarts and reloads. Global and instance targets are independent:
an event can go to both.

RabbitMQ is the exception in its default topology: global and instance queues hang off one
exchange and one routing key (``{instance}.{event}``), so one publish reaches both. An instance
with RabbitMQ on has one target that declares its own queues and the global ones; other
instances use the global target. In upstream's topology (``RABBITMQ_TOPOLOGY=upstream``) the
instance's exchange is its own, so its target and the global one are independent, as elsewhere.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from router.events import WIRE_NAMES, by_events_suffix
from router.instances import InstanceConfig
from router.settings import Settings
from router.signing import parse_secrets


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """Where and how to POST: the URL (before any by-events suffix) and per-target options."""

    key: str
    instance: str | None  # None for the global webhook
    url: str
    by_events: bool
    base64: bool = True  # False: remove data.message.base64 before sending
    headers: tuple[tuple[str, str], ...] = ()
    events: frozenset[str] = frozenset()
    signing_keys: tuple[bytes, ...] = ()  # Standard Webhooks: one signature per key

    sink = "webhook"

    def url_for(self, wire: str) -> str:
        return with_suffix(self.url, wire) if self.by_events else self.url


@functools.lru_cache(maxsize=65536)
def with_suffix(url: str, wire: str) -> str:
    """``url`` with the by-events suffix appended to its path (a query string stays after it)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + by_events_suffix(wire)))


@dataclass(frozen=True, slots=True)
class RabbitmqTarget:
    """Publishes to the exchange; declares the queues that should receive each event."""

    key: str
    instance: str | None  # None: the global target (instances without RabbitMQ of their own)
    instance_events: frozenset[str]  # declare and bind ``{instance}.{event}``
    global_events: frozenset[str]  # declare and bind ``{prefix}.{event}`` to ``*.{event}``
    sink = "rabbitmq"

    @property
    def events(self) -> frozenset[str]:
        return self.instance_events | self.global_events


@dataclass(frozen=True, slots=True)
class SqsTarget:
    """Sends to the queue named after the instance (or the global prefix) and the event."""

    key: str
    instance: str | None  # None: global mode, queues named after SQS_GLOBAL_PREFIX_NAME
    events: frozenset[str]
    sink = "sqs"


@dataclass(frozen=True, slots=True)
class PusherTarget:
    """One Pusher app (global credentials, or an instance's own): channel = instance."""

    key: str
    instance: str | None
    events: frozenset[str]
    app_id: str
    app_key: str
    secret: str
    cluster: str
    use_tls: bool
    sink = "pusher"


Target = WebhookTarget | RabbitmqTarget | SqsTarget | PusherTarget


@dataclass(frozen=True)
class Routes:
    """The routing index. ``targets_for`` is a dictionary lookup, never a scan."""

    targets: Mapping[str, Target] = field(default_factory=dict)
    _global: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    _by_instance: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    instances: Mapping[str, InstanceConfig] = field(default_factory=dict)
    _websocket: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def targets_for(self, instance: str, wire: str) -> tuple[str, ...]:
        """Keys of every target subscribed to ``wire`` for ``instance``, global ones first."""
        keys = self._by_instance.get((instance, wire))
        return keys if keys is not None else self._global.get(wire, ())

    topic_keys: bool = False  # RabbitMQ routes by ``{instance}.{event}`` (the router topology)

    @property
    def needs_topic_safe_names(self) -> bool:
        """The global RabbitMQ target routes every instance's events by ``{instance}.{event}``."""
        return self.topic_keys and global_rabbitmq_key() in self.targets

    def websocket_events(self, instance: str) -> frozenset[str]:
        """What ``ws://host/{instance}`` streams: the instance's ``websocket`` subscription."""
        return self._websocket.get(instance, frozenset())

    def token_of(self, instance: str) -> str | None:
        config = self.instances.get(instance)
        return config.token if config is not None else None


def global_webhook_key() -> str:
    return "webhook:global"


def instance_webhook_key(instance: str) -> str:
    return f"webhook:instance:{instance}"


def global_rabbitmq_key() -> str:
    return "rabbitmq:global"


def instance_rabbitmq_key(instance: str) -> str:
    return f"rabbitmq:instance:{instance}"


def build_routes(settings: Settings, instances: Mapping[str, InstanceConfig]) -> Routes:
    targets: dict[str, Target] = {}
    global_keys: dict[str, list[str]] = {wire: [] for wire in WIRE_NAMES}

    if settings.webhook_global_enabled and settings.webhook_global_url:
        target = WebhookTarget(
            key=global_webhook_key(),
            instance=None,
            url=settings.webhook_global_url,
            by_events=settings.webhook_global_webhook_by_events,
            events=settings.events_enabled("webhook"),
            signing_keys=parse_secrets(settings.webhook_global_signing_secret),
        )
        targets[target.key] = target
        for wire in target.events:
            global_keys[wire].append(target.key)

    rabbit_global = frozenset[str]()
    if settings.rabbitmq_enabled and settings.rabbitmq_global_enabled:
        rabbit_global = settings.events_enabled("rabbitmq")
        shared = RabbitmqTarget(global_rabbitmq_key(), None, frozenset(), rabbit_global)
        targets[shared.key] = shared
        for wire in rabbit_global:
            global_keys[wire].append(shared.key)

    if settings.sqs_enabled and settings.sqs_global_enabled:
        sqs_global = SqsTarget("sqs:global", None, settings.events_enabled("sqs"))
        targets[sqs_global.key] = sqs_global
        for wire in sqs_global.events:
            global_keys[wire].append(sqs_global.key)

    if settings.pusher_enabled and settings.pusher_global_enabled:
        pusher_global = PusherTarget(
            key="pusher:global",
            instance=None,
            events=settings.events_enabled("pusher"),
            app_id=settings.pusher_global_app_id or "",
            app_key=settings.pusher_global_key or "",
            secret=settings.pusher_global_secret or "",
            cluster=settings.pusher_global_cluster or "mt1",
            use_tls=settings.pusher_global_use_tls,
        )
        targets[pusher_global.key] = pusher_global
        for wire in pusher_global.events:
            global_keys[wire].append(pusher_global.key)

    shared_exchange = settings.rabbitmq_topology == "router"
    by_instance: dict[tuple[str, str], tuple[str, ...]] = {}
    for name, config in instances.items():
        own: dict[str, list[str]] = {}
        replaced: set[str] = set()
        if settings.rabbitmq_enabled and config.rabbitmq.enabled:
            rabbit = RabbitmqTarget(
                instance_rabbitmq_key(name),
                name,
                config.rabbitmq.subscribed(),
                rabbit_global if shared_exchange else frozenset(),
            )
            targets[rabbit.key] = rabbit
            if shared_exchange:
                replaced.add(global_rabbitmq_key())  # this instance's one publish serves both
            for wire in rabbit.events:
                own.setdefault(wire, []).append(rabbit.key)
        if settings.sqs_enabled and config.sqs.enabled:
            sqs = SqsTarget(f"sqs:instance:{name}", name, config.sqs.subscribed())
            targets[sqs.key] = sqs
            for wire in sqs.events:
                own.setdefault(wire, []).append(sqs.key)
        push = config.pusher
        if settings.pusher_enabled and push.enabled and push.app_id and push.key and push.secret:
            pusher = PusherTarget(
                key=f"pusher:instance:{name}",
                instance=name,
                events=push.subscribed(),
                app_id=push.app_id,
                app_key=push.key,
                secret=push.secret,
                cluster=push.cluster or "mt1",
                use_tls=push.use_tls,
            )
            targets[pusher.key] = pusher
            for wire in pusher.events:
                own.setdefault(wire, []).append(pusher.key)
        hook = config.webhook
        if hook.enabled and hook.url:
            target = WebhookTarget(
                key=instance_webhook_key(name),
                instance=name,
                url=hook.url,
                by_events=hook.by_events,
                base64=hook.base64,
                headers=tuple(hook.headers.items()),
                events=hook.subscribed(),
                signing_keys=parse_secrets(hook.signing_secret),
            )
            targets[target.key] = target
            for wire in target.events:
                own.setdefault(wire, []).append(target.key)
        for wire in WIRE_NAMES:
            keys = [key for key in global_keys[wire] if key not in replaced] + own.get(wire, [])
            if keys:
                by_instance[(name, wire)] = tuple(keys)

    return Routes(
        targets=targets,
        _global={wire: tuple(keys) for wire, keys in global_keys.items() if keys},
        _by_instance=by_instance,
        instances=dict(instances),
        _websocket={name: config.websocket.subscribed() for name, config in instances.items()},
        topic_keys=shared_exchange,
    )


def startup_targets(routes: Routes) -> tuple[str, ...]:
    """``application.startup`` concerns the router, not one instance: every target that names it."""
    return tuple(key for key, target in routes.targets.items() if "application.startup" in target.events)
