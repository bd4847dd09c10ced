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

from router.events import STARTUP, WIRE_NAMES
from router.instances import InstanceConfig
from router.settings import Settings
from router.sinks.registry import SINKS

Target = Any  # each sink's own target type (``router.sinks.Target`` describes them)


@dataclass(frozen=True)
class Routes:
    """The routing index. ``targets_for`` is a dictionary lookup, never a scan."""

    targets: Mapping[str, Target] = field(default_factory=dict)
    _global: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    _by_instance: Mapping[tuple[str, str], tuple[str, ...]] = field(default_factory=dict)
    instances: Mapping[str, InstanceConfig] = field(default_factory=dict)
    _websocket: Mapping[str, frozenset[str]] = field(default_factory=dict)
    # Rules of sinks whose global target routes every instance by its name (RabbitMQ's topic keys).
    _name_rules: tuple[Callable[[str], str | None], ...] = ()

    def targets_for(self, instance: str, wire: str) -> tuple[str, ...]:
        """Keys of every target subscribed to ``wire`` for ``instance``, global ones first."""
        keys = self._by_instance.get((instance, wire))
        return keys if keys is not None else self._global.get(wire, ())

    def refuses_instance(self, instance: str) -> str | None:
        """Why events of ``instance`` cannot be routed (a sink's naming rule), or None."""
        for rule in self._name_rules:
            if (why := rule(instance)) is not None:
                return why
        return None

    def websocket_events(self, instance: str) -> frozenset[str]:
        """What ``ws://host/{instance}`` streams: the instance's ``websocket`` subscription."""
        return self._websocket.get(instance, frozenset())

    def token_of(self, instance: str) -> str | None:
        config = self.instances.get(instance)
        return config.token if config is not None else None


def build_routes(settings: Settings, instances: Mapping[str, InstanceConfig]) -> Routes:
    targets: dict[str, Target] = {}
    global_keys: dict[str, list[str]] = {wire: [] for wire in WIRE_NAMES}
    own: dict[str, dict[str, list[str]]] = {name: {} for name in instances}
    covered: dict[str, set[str]] = {name: set() for name in instances}
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
                for wire in target.events:
                    own[placement.instance].setdefault(wire, []).append(target.key)
                if placement.covers is not None:
                    covered[placement.instance].add(placement.covers)
        rules.append(lambda name, kind=kind: kind.refuses_instance(settings, name))

    by_instance: dict[tuple[str, str], tuple[str, ...]] = {}
    for name in instances:
        for wire in WIRE_NAMES:
            keys = [key for key in global_keys[wire] if key not in covered[name]] + own[name].get(wire, [])
            if keys:
                by_instance[(name, wire)] = tuple(keys)

    return Routes(
        targets=targets,
        _global={wire: tuple(keys) for wire, keys in global_keys.items() if keys},
        _by_instance=by_instance,
        instances=dict(instances),
        _websocket={name: config.websocket.subscribed() for name, config in instances.items()},
        _name_rules=tuple(rules),
    )


def startup_targets(routes: Routes) -> tuple[str, ...]:
    """``application.startup`` concerns the router, not one instance: every target that names it."""
    return tuple(key for key, target in routes.targets.items() if STARTUP in target.events)
