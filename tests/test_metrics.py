"""``GET /metrics``, parsed with Prometheus' own text parser and checked against deliveries made."""

from __future__ import annotations

import asyncio

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from router.metrics import Metrics
from tests.conftest import hook_env, post_ingest, running


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200 and response.content_type == "text/plain"
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_counters_follow_the_deliveries_made(receiver, make_settings):
    receiver.script("/hook", [500, 200, 404])
    env = hook_env(
        receiver,
        "MESSAGES_UPSERT",
        "CALL",
        WEBHOOK_RETRY_INITIAL_DELAY_SECONDS="0.05",
        WEBHOOK_RETRY_JITTER_FACTOR="0",
        ROUTER_WEBHOOK_CONCURRENCY="1",
    )
    async with running(make_settings(**env)) as app:
        assert (await post_ingest(app, [{"event": "messages.upsert", "instance": "bot", "data": {}}]))[
            0
        ] == 202
        await receiver.wait_for(2)
        assert (await post_ingest(app, [{"event": "call", "instance": "bot", "data": {}}]))[0] == 202
        await receiver.wait_for(3)
        async with asyncio.timeout(10):  # the dead letter is written just after the attempt
            while (metrics := await scrape(app.port)).get(
                ("router_dead_letters", (("sink", "webhook"),))
            ) != 1:
                await asyncio.sleep(0.05)

    def delivered(event: str, outcome: str) -> float:
        return metrics.get(
            ("router_deliveries_total", (("event", event), ("outcome", outcome), ("sink", "webhook"))), 0
        )

    assert metrics[("router_events_accepted_total", (("adapter", "http"),))] == 2
    assert delivered("messages.upsert", "retried") == 1
    assert delivered("messages.upsert", "delivered") == 1
    assert delivered("call", "dead") == 1
    assert metrics[("router_delivery_attempt_seconds_count", (("sink", "webhook"),))] == 3
    # Acceptance to delivery: one delivered event, whose one retry waited 0.05 s.
    assert metrics[("router_delivery_latency_seconds_count", (("sink", "webhook"),))] == 1
    assert metrics[("router_delivery_latency_seconds_sum", (("sink", "webhook"),))] >= 0.05
    assert metrics[("router_queue_depth", (("sink", "webhook"),))] == 0
    assert metrics[("router_oldest_pending_age_seconds", (("sink", "webhook"),))] == 0


async def test_reloads_are_counted_and_timed(make_settings, tmp_path):
    async with running(make_settings()) as app:
        (tmp_path / "instances" / "bot.yaml").write_text(
            "webhook: {enabled: true, url: 'http://127.0.0.1:9/x'}\n"
        )
        await app.reload()
        got = await scrape(app.port)
    assert got[("router_reloads_total", ())] == 1
    total = got[("router_last_reload_seconds", (("part", "total"),))]
    loop = got[("router_last_reload_seconds", (("part", "loop"),))]
    assert 0 < loop <= total


def test_histogram_buckets_count_each_value_under_every_bound_it_does_not_exceed():
    """Prometheus' ``le`` is inclusive: a value on a bound counts in that bound's bucket."""
    metrics = Metrics()
    for seconds in (0.005, 0.0051, 0.3, 31.0):
        metrics.attempt("webhook", "call", "delivered", seconds, None)
    metrics.attempt("webhook", "call", "retried", 0.001, None)
    found = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
    }

    def bucket(le: str) -> float:
        return found[("router_delivery_attempt_seconds_bucket", (("le", le), ("sink", "webhook")))]

    assert [bucket(le) for le in ("0.005", "0.01", "0.25", "0.5", "30.0", "+Inf")] == [2, 3, 3, 4, 4, 5]
    assert found[("router_delivery_attempt_seconds_count", (("sink", "webhook"),))] == 5
    assert abs(found[("router_delivery_attempt_seconds_sum", (("sink", "webhook"),))] - 31.3111) < 1e-9
    key = ("router_deliveries_total", (("event", "call"), ("outcome", "retried"), ("sink", "webhook")))
    assert found[key] == 1
    assert (
        "router_delivery_latency_seconds_count",
        (("sink", "webhook"),),
    ) not in found  # none delivered with one
