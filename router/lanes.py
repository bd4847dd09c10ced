"""Lanes: the tasks that attempt deliveries, shared by the targets that reach one place.

A target's worker (``router.worker``) holds its leased deliveries, in the order their keys
require, and bounds its own attempts (its concurrency). The lanes that run those attempts
belong to a pool: one per place a sink reaches that targets share (a webhook host), or one per
target when its sink shares nothing. A pool runs up to ``limit`` lanes. A lane attempts one
delivery after another: while other targets wait for a lane, after each attempt it takes the
next one's turn (round robin); else it goes on with its own target; it ends when no target of
its pool has anything ready. So 10,000 targets with an event each on one host are served by
``limit`` lanes moving from target to target within a turn of the event loop, over ``limit``
connections, not by a task and a connection per event; and an idle pool runs no task.

A slow attempt must not hold a pool's places for everyone: once an attempt has been under way
for longer than the pool's stall time, its lane stops counting, and a new lane serves the next
in line. The stall time is ``STALL_FLOOR_S``, or four times the pool's usual attempt time if
that is longer; the usual time is learnt from the attempts that ended before they stalled, so
slow ones never raise it. A target that is slow for some therefore delays the others on its
pool by about the stall time, never by its slow attempts. A stalled lane whose attempt ends goes
on only if its pool has room again.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Protocol

from router import logs

log = logs.get_logger("router.delivery")
STALL_FLOOR_S = 0.01  # an attempt under way this long no longer holds a place (at the least)
STALL_TIMES = 4.0  # ... or this many times the pool's usual attempt time
_EWMA = 0.05  # weight of each attempt in that usual time


class Served(Protocol):
    """What a lane needs of a target's worker."""

    key: str

    @property
    def has_ready(self) -> bool:
        """A delivery is ready to attempt now."""

    async def attempt_next(self) -> None:
        """Attempt the next ready delivery (or wait a little for the sink to be ready)."""

    def lane_left(self) -> None:
        """A lane that was serving this worker left it (it may want another)."""


class _Attempt:
    """One attempt under way, as the stall watch sees it."""

    __slots__ = ("counted", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.counted = True  # its lane holds one of the pool's places (until the attempt ends or stalls)


class LanePool:
    """Lanes for the targets that share one place; see the module docstring."""

    __slots__ = (
        "_emptied",
        "_lane_ended",
        "_spawn",
        "_timer",
        "_turns",
        "counted",
        "key",
        "lanes",
        "limit",
        "under_way",
        "usual_s",
        "waiting",
    )

    def __init__(
        self,
        key: Hashable,
        limit: int,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        lane_ended: Callable[[], None],
        emptied: Callable[[LanePool], None],
    ) -> None:
        self.key = key
        self.limit = limit
        # The dispatcher runs lanes as its tasks (a stop waits for them); a lane says it ended.
        self._spawn = spawn
        self._lane_ended = lane_ended
        self._emptied = emptied  # the pool's last lane ended, with nobody waiting
        self.lanes = 0  # lane tasks running
        self.counted = 0  # of them, those holding a place (not stalled)
        # Targets waiting for lanes, each once, in turn; and how many lanes each is waiting for.
        self.waiting: collections.deque[Served] = collections.deque()
        self._turns: dict[Served, int] = {}
        self.under_way: collections.deque[_Attempt] = collections.deque()  # by start; counted first
        self.usual_s = 0.0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def stall_s(self) -> float:
        """How long an attempt is under way before its lane stops holding a place."""
        return max(STALL_FLOOR_S, STALL_TIMES * self.usual_s)

    @property
    def idle(self) -> bool:
        return self.lanes == 0 and not self.waiting

    def want(self, worker: Served) -> None:
        """``worker`` wants one more lane: a new one while the pool has room, else a turn."""
        if self.counted < self.limit and not self.waiting:
            self._start(worker)
            return
        turns = self._turns.get(worker)
        if turns is None:
            self.waiting.append(worker)
            self._turns[worker] = 1
            self._watch()
        else:
            self._turns[worker] = turns + 1

    def _next_in_line(self) -> Served:
        """The target whose turn it is: one lane, then to the back of the line if it wants more."""
        worker = self.waiting.popleft()
        turns = self._turns.pop(worker)
        if turns > 1:
            self._turns[worker] = turns - 1
            self.waiting.append(worker)
        return worker

    def _start(self, worker: Served) -> None:
        self.lanes += 1
        self.counted += 1
        self._spawn(self._lane(worker))

    async def _lane(self, worker: Served | None) -> None:
        """Attempt ``worker``'s ready deliveries until another target's turn comes (or none is
        left), then serve the next in line; end when nobody is. (One coroutine for the lane's
        life: with 10,000 targets it moves to another after every attempt.)"""
        holding = True  # this lane holds one of the pool's places
        loop = asyncio.get_running_loop()
        try:
            while worker is not None:
                try:
                    while worker.has_ready:
                        attempt = _Attempt(loop.time())
                        self.under_way.append(attempt)
                        if self.waiting and self._timer is None:  # (lanes started before this wait)
                            self._watch()
                        try:
                            await worker.attempt_next()
                        except Exception as exc:  # a bug: say so; the lane leaves this worker
                            log.error("delivery.bug", target=worker.key, exc_info=exc)
                            holding = self._ended_attempt(attempt, loop.time())
                            break
                        # Not holding: it stalled, and the pool is full now. Waiting: another's turn.
                        if not (holding := self._ended_attempt(attempt, loop.time())) or self.waiting:
                            break
                finally:
                    worker.lane_left()  # (which may put it in line again)
                worker = self._next_in_line() if holding and self.waiting else None
        finally:
            self.lanes -= 1
            if holding:
                self.counted -= 1
            task = asyncio.current_task()
            if self.waiting and self.counted < self.limit and not (task and task.cancelling()):
                self._start(self._next_in_line())  # (only if this lane ended by something unforeseen)
            elif self.idle:
                self._emptied(self)
            self._lane_ended()

    def _ended_attempt(self, attempt: _Attempt, now: float) -> bool:
        """``attempt`` ended; whether its lane holds a place (it may go on)."""
        under_way = self.under_way
        if attempt.counted:
            attempt.counted = False
            self.usual_s += (now - attempt.started - self.usual_s) * _EWMA
            holding = True
        elif self.counted < self.limit:  # it had stalled; there is room again
            self.counted += 1
            holding = True
        else:
            holding = False
        while under_way and not under_way[0].counted:
            under_way.popleft()
        if len(under_way) > 4 * self.limit:  # long attempts, nobody waiting: count the stalled out
            self._stalled()
        return holding

    def _watch(self) -> None:
        """While targets wait: when the oldest attempt under way will have stalled, look again."""
        if self._timer is not None or not self.under_way:
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(self.under_way[0].started + self.stall_s, self._stalled)

    def _stalled(self) -> None:
        """Attempts under way for longer than the stall time stop holding places; the places go
        to the targets in line."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        horizon = asyncio.get_running_loop().time() - self.stall_s
        under_way = self.under_way
        while under_way and (not under_way[0].counted or under_way[0].started <= horizon):
            attempt = under_way.popleft()
            if attempt.counted:
                attempt.counted = False
                self.counted -= 1
        while self.waiting and self.counted < self.limit:
            self._start(self._next_in_line())
        if self.waiting:
            self._watch()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
