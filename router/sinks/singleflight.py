"""One question under way per key: callers asking the same thing at the same time share one
answer.

A sink's lanes start together: 64 attempts for a subject the NATS sink has not seen yet would
each ask the server which stream captures it before their first publish, and as many for a new
RabbitMQ queue would each declare it. ``SingleFlight.ask`` lets the first caller ask and the
others wait for its answer or its error.
The question runs as a task of its own: a caller that is cancelled stops waiting, and the
others still get the answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Questions under way, by key; see the module docstring."""

    __slots__ = ("_under_way",)

    def __init__(self) -> None:
        self._under_way: dict[Hashable, asyncio.Task[T]] = {}

    async def ask(self, key: Hashable, question: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """``question()``'s answer, shared with whoever asks ``key`` while it is under way."""
        task = self._under_way.get(key)
        if task is None:
            task = asyncio.create_task(question(), name=f"ask {key}")
            self._under_way[key] = task
            task.add_done_callback(lambda done: self._answered(key, done))
        return await asyncio.shield(task)

    def _answered(self, key: Hashable, task: asyncio.Task[T]) -> None:
        if self._under_way.get(key) is task:
            del self._under_way[key]
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have stopped waiting

    def cancel(self) -> None:
        """Stop every question under way (the sink is closing)."""
        for task in self._under_way.values():
            task.cancel()
