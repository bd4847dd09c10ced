"""The delivery core on its own (store, dispatcher, workers) with an in-memory sink."""

from __future__ import annotations

import asyncio
from pathlib import Path

from router.current import Current
from router.deadletters import dead_letters, show
from router.delivery import Dispatcher
from router.events import Event, new_event_id, utc_timestamp
from router.routing import Routes
from router.sinks import BaseSink
from router.sinks.webhook import WebhookTarget
from router.store import NewDelivery, Store


class BrokenSink(BaseSink):
    """A sink with a bug: every attempt raises something that is not a delivery error."""

    name = "webhook"

    def __init__(self) -> None:
        self.attempts = 0

    async def send(self, target: object, event: Event) -> int | None:
        self.attempts += 1
        raise RuntimeError("a bug in the sink")


async def test_an_unexpected_error_counts_as_an_attempt_and_ends_as_a_dead_letter(make_settings, tmp_path):
    settings = make_settings(WEBHOOK_RETRY_MAX_ATTEMPTS="3", WEBHOOK_RETRY_INITIAL_DELAY_SECONDS="0.01")
    path = tmp_path / "router.db"
    store = await Store.open(path)
    store_task = asyncio.create_task(store.run())
    target = WebhookTarget("webhook:global", None, "http://127.0.0.1:9/x", False, events=frozenset({"call"}))
    sink = BrokenSink()
    dispatcher = Dispatcher(store, {"webhook": sink}, Current(Routes(targets={target.key: target})), settings)
    running = asyncio.create_task(dispatcher.run(grace_s=1))
    try:
        event = Event(new_event_id(), "bot", "call", b"{}", utc_timestamp())
        await store.accept([NewDelivery(event, (target.key,))])
        dispatcher.notify([target.key])
        async with asyncio.timeout(10):
            while (await store.counts())["dead"] == 0:
                await asyncio.sleep(0.02)
    finally:
        dispatcher.stop()
        await running
        await store.close()
        await store_task
        store.shutdown()
    assert sink.attempts == 3, "retried by the policy, then given up: never forever"
    [dead] = dead_letters(Path(path))
    shown = show(Path(path), dead["id"])
    assert shown["last_error"] == "internal error: RuntimeError: a bug in the sink (gave up after 3 attempts)"
    assert [error["attempt"] for error in shown["errors"]] == [1, 2, 3]
