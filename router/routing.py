"""(instance, event) -> the targets that receive it, from an index built once per configuration.

A *target* is one place deliveries go: the global webhook, one instance's RabbitMQ queues ...
Its ``key`` names it in the durable queue (``webhook:global``, ``webhook:instance:<name>``), so
stored deliveries survive restarts and reloads. Each sink places its own targets
(``SinkKind.place``): a global one takes every instance's events, an instance's takes its own.
Global and instance targets are independent, an event can go to both, unless an instance's
target ``covers`` a global one (one RabbitMQ publish reaching both queues).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from router.apikeys import key_digest
from router.events import STARTUP, WIRE_NAMES
from router.instances import InstanceConfig
from router.settings import Settings
from router.sinks import SinkKind
from router.sinks.registry import SINKS

MAX_REMEMBERED_NAMES = 1 << 16
Target = Any  # each sink's own target type (``router.sinks.Target`` describes them)


@dataclass(frozen=True)
class Routes:
    """The routing index. ``targets_for`` is two dictionary lookups, never a scan; its size grows
    with the targets there are, not with instances times events."""

    targets: Mapping[str, Target] = field(default_factory=dict)
    _global: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    _own: Mapping[str, tuple[Target, ...]] = field(default_factory=dict)  # instance -> its targets
    _covered: Mapping[str, frozenset[str]] = field(default_factory=dict)  # instance -> global keys
    instances: Mapping[str, InstanceConfig] = field(default_factory=dict)
    _websocket: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # Rules of sinks whose global target routes every instance by its name (RabbitMQ's topic keys).
    _name_rules: tuple[Callable[[str], str | None], ...] = ()
    _tokens: frozenset[bytes] = frozenset()  # digests of the instances' tokens (``key_digest``)
    # Instance names the rules were asked about, and their answers (intake asks for every event).
    _refusals: dict[str, str | None] = field(default_factory=dict, compare=False, repr=False)

    def targets_for(self, instance: str, wire: str) -> tuple[str, ...]:
        """Keys of every target subscribed to ``wire`` for ``instance``, global ones first."""
        everyone = self._global.get(wire, ())
        own = self._own.get(instance)
        if own is None:  # most instances: the global targets alone
            return everyone
        covered = self._covered.get(instance)
        if covered:
            everyone = tuple(key for key in everyone if key not in covered)
        return everyone + tuple(target.key for target in own if wire in target.events)

    def refuses_instance(self, instance: str) -> str | None:
        """Why events of ``instance`` cannot be routed (a sink's naming rule), or None."""
        if not self._name_rules:
            return None
        known = self._refusals
        if instance in known:
            return known[instance]
        why = None
        for rule in self._name_rules:
            if (why := rule(instance)) is not None:
                break
        if len(known) >= MAX_REMEMBERED_NAMES:
            known.clear()
        known[instance] = why
        return why

    def websocket_events(self, instance: str) -> frozenset[str]:
        """What ``ws://host/{instance}`` streams: the instance's ``websocket`` subscription."""
        return self._websocket.get(instance, frozenset())

    def is_token(self, key: str) -> bool:
        """Whether ``key`` is some instance's token (which one: ``token_of`` each instance)."""
        return key_digest(key) in self._tokens

    def token_of(self, instance: str) -> str | None:
        config = self.instances.get(instance)
        return config.token if config is not None else None


def build_routes(settings: Settings, instances: Mapping[str, InstanceConfig]) -> Routes:
    targets: dict[str, Target] = {}
    global_keys: dict[str, list[str]] = {wire: [] for wire in WIRE_NAMES}
    own: dict[str, list[Target]] = {}
    covered: dict[str, set[str]] = {}
    rules = []
    for kind in SINKS:
        if not kind.enabled(settings):
            continue
        for placement in kind.place(settings, instances):
            target = placement.target
            targets[target.key] = target
            if placement.instance is None:
                for wire in target.events:
                    global_keys[wire].append(target.key)
            else:
                own.setdefault(placement.instance, []).append(target)
                if placement.covers is not None:
                    covered.setdefault(placement.instance, set()).add(placement.covers)
        if type(kind).refuses_instance is not SinkKind.refuses_instance:  # the sink has a rule
            rules.append(lambda name, kind=kind: kind.refuses_instance(settings, name))

    return Routes(
        targets=targets,
        _global={wire: tuple(keys) for wire, keys in global_keys.items() if keys},
        _own={name: tuple(mine) for name, mine in own.items()},
        _covered={name: frozenset(keys) for name, keys in covered.items()},
        instances=dict(instances),
        _websocket={name: config.websocket.subscribed() for name, config in instances.items()},
        _tokens=frozenset(key_digest(config.token) for config in instances.values() if config.token),
        _name_rules=tuple(rules),
    )


def startup_targets(routes: Routes) -> tuple[str, ...]:
    """``application.startup`` concerns the router, not one instance: every target that names it."""
    return tuple(key for key, target in routes.targets.items() if STARTUP in target.events)
