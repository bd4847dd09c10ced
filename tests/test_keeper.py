"""A sink's connection keeper ends when the sink closes, whatever its client library does with the
cancellation (``router.sinks.keeper``)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from router.sinks.keeper import KeptConnectionSink

SETTINGS = SimpleNamespace(router_queue_retry_initial_delay_s=0.05, router_queue_retry_max_delay_s=0.05)


class RetriesInside(KeptConnectionSink):
    """Connects the way nats-py's ``connect`` does with reconnects unlimited: it retries failed
    attempts inside the call, and each attempt is bounded by ``asyncio.wait_for``. On Python 3.11,
    when the cancellation comes in the turn in which the attempt failed, ``wait_for`` raises the
    attempt's error instead, and the call goes on retrying."""

    name = "retries-inside"

    def __init__(self) -> None:
        super().__init__(SETTINGS)
        self.attempt: asyncio.Future[None] | None = None
        self.attempts = 0

    async def _keep_connected(self) -> None:
        while True:  # inside the library's connect: it never looks at ``_closing``
            self.attempts += 1
            self.attempt = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self.attempt, 0.05)
            except (ConnectionRefusedError, TimeoutError):
                await asyncio.sleep(0.01)

    async def aclose(self) -> None:
        await self._stop_keeper()


async def test_closing_ends_a_keeper_whose_connect_lost_the_cancellation():
    sink = RetriesInside()
    await sink.open()
    while sink.attempt is None:
        await asyncio.sleep(0)
    sink.attempt.set_exception(ConnectionRefusedError(111, "Connect call failed"))
    closing = asyncio.create_task(sink.aclose())  # before the connect has seen the failure
    done, _ = await asyncio.wait({closing}, timeout=10)
    assert done == {closing}, f"the keeper is still connecting after {sink.attempts} attempts"
    assert sink._keeper is not None and sink._keeper.done()
    assert sink.attempts >= 2  # the first cancellation was lost: the connect tried again


async def test_closing_a_keeper_that_takes_its_cancellation_stops_it_at_once():
    sink = RetriesInside()
    await sink.open()
    while sink.attempt is None:
        await asyncio.sleep(0)
    await asyncio.wait_for(sink.aclose(), 10)
    assert sink._keeper is not None and sink._keeper.cancelled()
    assert sink.attempts == 1
