"""Prometheus metrics, served at ``GET /metrics`` (prometheus-client's text format).

Counters and histograms are updated as events are accepted and attempts end; queue depth,
dead letters and the oldest waiting delivery's age are read from the store at each scrape.
Each ``App`` has its own registry, so several daemons in one process (the tests) stay apart.
With PostgreSQL the queue figures are those of the queue every router shares; the counters,
``router_in_flight`` and ``router_info`` are this router's.
"""

from __future__ import annotations

import bisect
import collections
import functools
from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

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
        self._attempts = _Attempts()
        registry.register(self._attempts)
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
        attempts = self._attempts
        key = (sink, event, outcome)
        attempts.outcomes[key] = attempts.outcomes.get(key, 0) + 1
        attempts.seconds[sink].observe(seconds)
        if latency_s is not None:
            attempts.latency[sink].observe(latency_s)

    def set_store_state(self, state: Mapping[str, tuple[int, int, float | None]]) -> None:
        """``sink -> (waiting, dead, oldest waiting age in seconds)``, as the store reports it."""
        for sink in sorted({kind.name for kind in SINKS} | set(state)):
            waiting, dead, oldest = state.get(sink, (0, 0, None))
            self.queue_depth.labels(sink).set(waiting)
            self.dead_letters.labels(sink).set(dead)
            self.oldest_pending.labels(sink).set(oldest or 0.0)

    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))


class _Attempts:
    """Delivery attempts, counted in plain dictionaries (one attempt costs a few hundred
    nanoseconds here, against microseconds of prometheus-client's locked counters and histograms,
    once per event) and reported as the same three metrics at each scrape."""

    def __init__(self) -> None:
        self.outcomes: dict[tuple[str, str, str], int] = {}  # (sink, event, outcome) -> attempts
        # sink -> its attempts' durations; sink -> acceptance to acknowledgement
        self.seconds: collections.defaultdict[str, _Buckets] = collections.defaultdict(
            functools.partial(_Buckets, ATTEMPT_BUCKETS)
        )
        self.latency: collections.defaultdict[str, _Buckets] = collections.defaultdict(
            functools.partial(_Buckets, LATENCY_BUCKETS)
        )

    def collect(self) -> Iterator[Metric]:
        deliveries = CounterMetricFamily(
            "router_deliveries",
            "Delivery attempts by how they ended: delivered, retried or dead (a dead letter)",
            labels=["sink", "event", "outcome"],
        )
        for labels, count in sorted(self.outcomes.items()):
            deliveries.add_metric(labels, count)
        yield deliveries
        yield _histogram(
            "router_delivery_attempt_seconds",
            "How long one delivery attempt took (for webhooks: the receiver's response time)",
            self.seconds,
        )
        yield _histogram(
            "router_delivery_latency_seconds",
            "From acceptance at intake to the sink's acknowledgement, retries included",
            self.latency,
        )


class _Buckets:
    """One histogram's observations: the count in each bucket (the last one: above every bound)
    and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # the first bound >= value
        self.total += value


def _histogram(name: str, documentation: str, histograms: dict[str, _Buckets]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=["sink"])
    for sink, found in sorted(histograms.items()):
        cumulative, buckets = 0, []
        for bound, count in zip([*map(floatToGoString, found.bounds), "+Inf"], found.counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        family.add_metric([sink], buckets, found.total)
    return family
