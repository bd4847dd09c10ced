"""Sinks with one connection of their own (RabbitMQ, NATS), opened and kept open by a keeper task.

The keeper connects with backoff on the queue retry schedule for as long as it takes; deliveries
wait for the connection (``wait_ready``) instead of each trying to connect. ``aclose`` ends the
keeper whatever it is doing: ``_closing`` is set before the cancellation, because a client
library's connect can turn a cancellation into its own failure (Python 3.11's ``wait_for``), and
the keeper's loop must then end on its own; a connect that retries inside itself is cancelled
again until it ends.
"""

from __future__ import annotations

import asyncio
from typing import Any

from router.retry import RetryPolicy
from router.sinks import BaseSink

CANCEL_AGAIN_S = 0.1  # how long a keeper has to end before it is cancelled again


class KeptConnectionSink(BaseSink):
    """``_keep_connected`` is the sink's own loop, ``while not self._closing``; it sets and clears
    ``_up`` (and ``connected``) as the connection opens and closes."""

    def __init__(self, settings: Any) -> None:
        self._up = asyncio.Event()  # set while the connection is open
        self.connected = False
        self._keeper: asyncio.Task[None] | None = None
        self._closing = False  # aclose was called: the keeper ends, whatever it was doing
        self._last_error = "not connected yet"
        # Reconnecting follows the queue retry schedule (ROUTER_QUEUE_RETRY_*), never faster than 50 ms.
        self.backoff = RetryPolicy.for_queues(
            max(settings.router_queue_retry_initial_delay_s, 0.05), settings.router_queue_retry_max_delay_s
        )

    @property
    def ready(self) -> bool:  # type: ignore[override]
        return self._up.is_set()

    async def wait_ready(self) -> None:
        await self._up.wait()

    async def open(self) -> None:
        self._keeper = asyncio.create_task(self._keep_connected(), name=f"{self.name} connection")

    async def _keep_connected(self) -> None:
        raise NotImplementedError

    async def _stop_keeper(self) -> None:
        """The first step of ``aclose``: the keeper has ended when this returns.

        A cancellation can be lost inside a client library's connect, which then goes on
        retrying (nats-py's does, with reconnects unlimited): it is repeated until it lands."""
        self._closing = True
        keeper = self._keeper
        if keeper is None:
            return
        while not keeper.done():
            keeper.cancel()
            await asyncio.wait({keeper}, timeout=CANCEL_AGAIN_S)
        if not keeper.cancelled() and (error := keeper.exception()) is not None:
            raise error
