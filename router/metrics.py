"""Prometheus metrics, served at ``GET /metrics`` (prometheus-client's text format).

Counters and histograms are updated as events are accepted and attempts end; queue depth,
dead letters and the oldest waiting delivery's age are read from the store at each scrape.
Each ``App`` has its own registry, so several daemons in one process (the tests) stay apart.
With PostgreSQL the queue figures are those of the queue every router shares; the counters,
``router_in_flight`` and ``router_info`` are this router's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from router.sinks.registry import SINKS

ATTEMPT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Acceptance to delivery spans retries and outages: milliseconds to hours.
LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.accepted = Counter(
            "router_events_accepted", "Events accepted at intake", ["adapter"], registry=registry
        )
        self.deliveries = Counter(
            "router_deliveries",
            "Delivery attempts by how they ended: delivered, retried or dead (a dead letter)",
            ["sink", "event", "outcome"],
            registry=registry,
        )
        self.attempt_seconds = Histogram(
            "router_delivery_attempt_seconds",
            "How long one delivery attempt took (for webhooks: the receiver's response time)",
            ["sink"],
            buckets=ATTEMPT_BUCKETS,
            registry=registry,
        )
        self.latency = Histogram(
            "router_delivery_latency_seconds",
            "From acceptance at intake to the sink's acknowledgement, retries included",
            ["sink"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_depth = Gauge(
            "router_queue_depth", "Deliveries waiting or in flight", ["sink"], registry=registry
        )
        self.dead_letters = Gauge("router_dead_letters", "Dead letters kept", ["sink"], registry=registry)
        self.oldest_pending = Gauge(
            "router_oldest_pending_age_seconds",
            "Age of the oldest event with a delivery still waiting",
            ["sink"],
            registry=registry,
        )
        self.websocket_clients = Gauge(
            "router_websocket_clients", "WebSocket and socket.io clients connected", registry=registry
        )
        self.websocket_slow_disconnects = Gauge(
            "router_websocket_slow_disconnects", "Clients dropped for falling behind", registry=registry
        )
        self._children: dict[tuple[str, str, str], tuple[Any, Any, Any]] = {}
        self.idle = Gauge(
            "router_idle",
            "1 when every due delivery has been attempted and none is in flight (retries due later may wait)",
            registry=registry,
        )
        self.reloads = Counter("router_reloads", "Configuration reloads completed", registry=registry)
        self.reload_seconds = Gauge(
            "router_last_reload_seconds",
            "How long the last reload took: in all (``total``), and on the event loop (``loop``)",
            ["part"],
            registry=registry,
        )
        self.info = Gauge(
            "router_info",
            "1, labelled with this router's name and its queue store (sqlite or postgresql)",
            ["node", "store"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "router_in_flight",
            "Attempts under way in this router (the queue figures are the store's)",
            registry=registry,
        )
        self.sink_connected = Gauge(
            "router_sink_connected",
            "1 while a sink with a connection of its own (RabbitMQ, NATS) has it open",
            ["sink"],
            registry=registry,
        )

    def attempt(self, sink: str, event: str, outcome: str, seconds: float, latency_s: float | None) -> None:
        key = (sink, event, outcome)
        children = self._children.get(key)
        if children is None:  # labels() costs a lock and a lookup: once per combination, not per event
            children = (
                self.deliveries.labels(*key),
                self.attempt_seconds.labels(sink),
                self.latency.labels(sink),
            )
            self._children[key] = children
        deliveries, attempt_seconds, latency = children
        deliveries.inc()
        attempt_seconds.observe(seconds)
        if latency_s is not None:
            latency.observe(latency_s)

    def set_store_state(self, state: Mapping[str, tuple[int, int, float | None]]) -> None:
        """``sink -> (waiting, dead, oldest waiting age in seconds)``, as the store reports it."""
        for sink in sorted({kind.name for kind in SINKS} | set(state)):
            waiting, dead, oldest = state.get(sink, (0, 0, None))
            self.queue_depth.labels(sink).set(waiting)
            self.dead_letters.labels(sink).set(dead)
            self.oldest_pending.labels(sink).set(oldest or 0.0)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))
