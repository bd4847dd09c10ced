"""Micro-batching for sinks whose API takes several messages in one request (SQS, Pusher).

Every delivery attempt is still one ``send`` call with its own outcome. Attempts for one
destination that are ready together wait for each other: the first of them sends what is
waiting in requests of up to ``limit`` items, in order, until nothing waits; the others wait
for their own item's outcome. Nothing is delayed to fill a batch: a lone attempt goes alone.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from router.errors import DeliveryError, RetryableError

T = TypeVar("T")


@dataclass
class Item(Generic[T]):
    """One attempt's payload and its outcome; ``flush`` resolves ``done`` for each item."""

    payload: T
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def succeed(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def fail(self, error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)


Flush = Callable[[str, list[Item[T]]], Awaitable[None]]


class Batcher(Generic[T]):
    """Groups items by destination and sends them with ``flush(destination, items)``."""

    def __init__(self, limit: int, flush: Flush[T], describe: str) -> None:
        self.limit = limit
        self._flush = flush
        self._describe = describe  # for errors: "SQS send", "Pusher request"
        self._pending: dict[str, list[Item[T]]] = {}
        self._sending: set[str] = set()

    async def submit(self, destination: str, payload: T) -> None:
        """Send ``payload`` to ``destination``, batched with others; raises its own failure."""
        item = Item(payload)
        self._pending.setdefault(destination, []).append(item)
        if destination not in self._sending:
            await self._send_pending(destination)
        await item.done

    async def _send_pending(self, destination: str) -> None:
        self._sending.add(destination)
        try:
            await asyncio.sleep(0)  # let the attempts started together join this batch
            while pending := self._pending.get(destination):
                batch, self._pending[destination] = pending[: self.limit], pending[self.limit :]
                try:
                    await self._flush(destination, batch)
                except DeliveryError as exc:
                    for item in batch:
                        item.fail(exc)
                except BaseException as exc:  # never leave an attempt waiting
                    for item in batch:
                        item.fail(RetryableError(f"{self._describe} failed: {exc!r}"))
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                for item in batch:  # a flush that forgot an item must not hang its attempt
                    item.fail(RetryableError(f"{self._describe}: no outcome for this message"))
        finally:
            self._sending.discard(destination)
            if not self._pending.get(destination):
                self._pending.pop(destination, None)
