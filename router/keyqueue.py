"""One target's leased deliveries in memory, in the order their ordering keys require.

Deliveries that share an ordering key (``router.ordering``: one chat, one instance) are attempted
one at a time, oldest first: the others of that key wait here behind the one ready or in flight.
A retry sends them back to the store, due with it (``Store.retry`` holds later ones back there
too), so nothing of a key overtakes a delivery waiting for its retry. Deliveries without a key
are ready at once.

At most ``MAX_FOLLOWERS`` of one key wait in memory; more are *parked* in the store and come
back a batch at a time once those have gone (``unpark``), so one busy conversation never fills
the worker's share of memory and holds up the others.

This is bookkeeping only: the worker (``router.worker``) attempts what is ``ready``, and writes
to the store what ``admit``, ``retried`` and ``finished`` hand back.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Sequence

from router.store import Lease

MAX_FOLLOWERS = 16  # deliveries of one key waiting in memory behind the one ready or in flight


class KeyQueue:
    __slots__ = ("_blocked", "_followers", "_parked", "_unparking", "held", "ready")

    def __init__(self) -> None:
        # Ready to attempt: the oldest of their key here or in flight, or keyless.
        self.ready: collections.deque[Lease] = collections.deque()
        # Key -> the deliveries of that key waiting behind the one ready or in flight
        # (a key is here exactly while one of its deliveries is ready or in flight).
        # (Most keys have nobody behind theirs: an empty tuple until one follows, not a deque.)
        self._followers: dict[str, collections.deque[Lease] | tuple[()]] = {}
        self.held = 0  # deliveries in ``_followers``
        # Key -> (the delivery waiting for its retry, when that is due): until that delivery is
        # leased again, later ones of its key go back (a lease may have been read before it).
        self._blocked: dict[str, tuple[int, float]] = {}
        # Key -> the oldest of its deliveries parked in the store: those from there on are parked.
        self._parked: dict[str, int] = {}
        # Keys being unparked -> the oldest of theirs parked meanwhile (or None).
        self._unparking: dict[str, int | None] = {}

    def __len__(self) -> int:
        """Deliveries held in memory and not in flight."""
        return len(self.ready) + self.held

    @property
    def parking(self) -> bool:
        """Some deliveries are parked in the store, waiting to come back here."""
        return bool(self._parked)

    def admit(self, leases: Sequence[Lease]) -> tuple[dict[float, list[Lease]], list[Lease]]:
        """Take leased deliveries, oldest first. Returns those to give back to the store, by
        when they are due again (their key waits for a retry), and those to park."""
        ready = self.ready
        late: dict[float, list[Lease]] = {}
        park: list[Lease] = []
        for lease in leases:
            key = lease.okey
            if key is None:
                ready.append(lease)
                continue
            blocked = self._blocked.get(key)
            if blocked is not None:
                head, until = blocked
                if lease.delivery_id == head:  # the retried one is back: its key goes on
                    del self._blocked[key]
                elif lease.delivery_id > head:  # read before that retry was stored: not yet
                    late.setdefault(until, []).append(lease)
                    continue
            followers = self._followers.get(key)
            parked = self._parked.get(key)
            if (parked is not None and lease.delivery_id >= parked) or (
                followers is not None and len(followers) >= MAX_FOLLOWERS
            ):
                self._park(key, lease.delivery_id)
                park.append(lease)
                continue
            if followers is None:
                self._followers[key] = ()
                ready.append(lease)
                continue
            if not isinstance(followers, collections.deque):
                self._followers[key] = followers = collections.deque()
            self.held += 1
            if followers and followers[-1].delivery_id > lease.delivery_id:  # a replayed dead letter
                bisect.insort(followers, lease, key=lambda waiting: waiting.delivery_id)
            else:
                followers.append(lease)
        return late, park

    def _park(self, key: str, delivery_id: int) -> None:
        self._parked[key] = min(delivery_id, self._parked.get(key, delivery_id))
        if key in self._unparking:
            earlier = self._unparking[key]
            self._unparking[key] = delivery_id if earlier is None else min(earlier, delivery_id)

    def retried(self, lease: Lease, retry_at: float) -> list[Lease]:
        """``lease`` waits for a retry at ``retry_at``: its key's followers, to give back."""
        if lease.okey is None:
            return []
        self._blocked[lease.okey] = (lease.delivery_id, retry_at)
        self._parked.pop(lease.okey, None)  # the store's retry made them pending, due with it
        followers = self._followers.pop(lease.okey, None)
        if not followers:
            return []
        self.held -= len(followers)
        return list(followers)

    def finished(self, lease: Lease) -> str | None:
        """``lease`` is delivered or a dead letter (and written): the next of its key is ready.
        Returns the key when its parked deliveries are to come back now (``unpark``)."""
        key = lease.okey
        followers = self._followers.get(key) if key is not None else None
        if key is None or followers is None:  # keyless, or ended twice (after a bug)
            return None
        if isinstance(followers, collections.deque) and followers:
            self.held -= 1
            self.ready.append(followers.popleft())
            return None
        del self._followers[key]
        if key in self._parked and key not in self._unparking:
            self._unparking[key] = None
            return key
        return None

    def unparked(self, key: str, still_parked: int | None) -> None:
        """The store made a batch of ``key``'s parked deliveries pending; ``still_parked`` is the
        oldest it left parked."""
        meanwhile = self._unparking.pop(key, None)
        oldest = [found for found in (still_parked, meanwhile) if found is not None]
        if oldest:
            self._parked[key] = min(oldest)
        else:
            self._parked.pop(key, None)
