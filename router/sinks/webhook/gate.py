"""How many webhook requests go to one host at once, shared fairly by the targets on it.

Thousands of instances often post to one host (one CRM, one automation server). Each target's
worker bounds its own attempts, but 10,000 targets with an event each would open 10,000
connections to that host at once: the host spends its time accepting connections, and no event
arrives sooner. So each host (scheme, name, port) admits up to ``limit`` requests at once; the
others wait their turn, one target after another (round robin), so no target's backlog keeps
another's first request waiting behind it.

A slow request must not hold the host's places for everyone: once a request has been under way
for longer than the host's stall time, it stops counting and the next one goes. The stall time
is ``STALL_FLOOR_S``, or four times the host's usual answer time if that is longer; the usual
time is learnt from the answers that came back before they stalled, so the slow answers never
raise it. A host that answers slowly for some targets therefore delays the others by about the
stall time, never by its slow answers.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Hashable

HOST_LIMIT = 256  # requests at once to one host, by default (ROUTER_WEBHOOK_HOST_CONCURRENCY)
STALL_FLOOR_S = 0.01  # a request under way this long no longer holds a place (at the least)
STALL_TIMES = 4.0  # ... or this many times the host's usual time for an answer
_EWMA = 0.05  # weight of each answer in that usual time


class Ticket:
    """One admitted request."""

    __slots__ = ("counted", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.counted = True  # holds one of the host's places (until it ends or stalls)


class _Host:
    __slots__ = ("running", "timer", "turns", "under_way", "usual_s", "waiting")

    def __init__(self) -> None:
        self.running = 0  # tickets that count
        self.under_way: collections.deque[Ticket] = collections.deque()  # by start, counted first
        self.waiting: dict[Hashable, collections.deque[asyncio.Future[Ticket]]] = {}
        self.turns: collections.deque[Hashable] = collections.deque()  # owners with waiters, in turn
        self.usual_s = 0.0
        self.timer: asyncio.TimerHandle | None = None

    @property
    def stall_s(self) -> float:
        """How long a request is under way before it stops holding a place."""
        return max(STALL_FLOOR_S, STALL_TIMES * self.usual_s)


class HostGate:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._hosts: dict[Hashable, _Host] = {}

    def enter_now(self, host_key: Hashable) -> Ticket | None:
        """A place for a request to ``host_key`` if it has room and nobody waits, else None."""
        host = self._hosts.get(host_key)
        if host is None:
            host = self._hosts[host_key] = _Host()
        if host.running < self.limit and not host.turns:
            return self._admit(host, asyncio.get_running_loop().time())
        return None

    async def enter(self, host_key: Hashable, owner: Hashable) -> Ticket:
        """A place for one request of ``owner`` to ``host_key``: at once while the host has room,
        else in ``owner``'s turn. Cancelling the wait gives the place back."""
        ticket = self.enter_now(host_key)
        if ticket is not None:
            return ticket
        host = self._hosts[host_key]
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Ticket] = loop.create_future()
        queue = host.waiting.get(owner)
        if queue is None:
            queue = host.waiting[owner] = collections.deque()
            host.turns.append(owner)
        queue.append(waiter)
        self._watch(host, host_key, loop)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.leave(host_key, waiter.result())  # admitted as the wait was cancelled
            elif waiter in queue:  # (a timeout): out of the line
                queue.remove(waiter)
                if not queue and host.waiting.get(owner) is queue:
                    del host.waiting[owner]
                    host.turns.remove(owner)
            raise

    def leave(self, host_key: Hashable, ticket: Ticket) -> None:
        """The request ``ticket`` admitted has ended: its place goes to the next in turn."""
        host = self._hosts.get(host_key)
        if host is None:
            return
        if ticket.counted:
            ticket.counted = False
            host.running -= 1
            elapsed = asyncio.get_running_loop().time() - ticket.started
            host.usual_s += (elapsed - host.usual_s) * _EWMA
        under_way = host.under_way
        while under_way and not under_way[0].counted:
            under_way.popleft()
        self._next(host)
        if host.turns:
            self._watch(host, host_key, asyncio.get_running_loop())
        elif host.running == 0 and not under_way:
            if host.timer is not None:
                host.timer.cancel()
            del self._hosts[host_key]

    def _admit(self, host: _Host, now: float) -> Ticket:
        ticket = Ticket(now)
        host.running += 1
        host.under_way.append(ticket)
        return ticket

    def _next(self, host: _Host) -> None:
        """Waiters in turn, one per owner, while the host has room."""
        now = None
        while host.running < self.limit and host.turns:
            owner = host.turns.popleft()
            queue = host.waiting[owner]
            waiter = queue.popleft()
            if queue:
                host.turns.append(owner)
            else:
                del host.waiting[owner]
            if waiter.done():  # cancelled: its task has not yet run to take itself out of line
                continue
            now = asyncio.get_running_loop().time() if now is None else now
            waiter.set_result(self._admit(host, now))

    def _watch(self, host: _Host, host_key: Hashable, loop: asyncio.AbstractEventLoop) -> None:
        """While some wait: when the oldest request under way will have stalled, look again."""
        if host.timer is not None or not host.under_way:
            return
        host.timer = loop.call_at(host.under_way[0].started + host.stall_s, self._stalled, host, host_key)

    def _stalled(self, host: _Host, host_key: Hashable) -> None:
        """Requests under way for longer than the host's stall time stop holding places."""
        host.timer = None
        loop = asyncio.get_running_loop()
        horizon = loop.time() - host.stall_s
        under_way = host.under_way
        while under_way and (not under_way[0].counted or under_way[0].started <= horizon):
            ticket = under_way.popleft()
            if ticket.counted:
                ticket.counted = False
                host.running -= 1
        self._next(host)
        if host.turns:
            self._watch(host, host_key, loop)
