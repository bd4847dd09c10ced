"""One target's leased deliveries in memory, in the order their ordering keys require.

Deliveries that share an ordering key (``router.ordering``: one chat, one instance) are attempted
one at a time, oldest first: the others of that key wait here behind the one ready or in flight.
A retry sends them back to the store, due with it (``Store.retry`` holds later ones back there
too), so nothing of a key overtakes a delivery waiting for its retry. Deliveries without a key
are ready at once.

This is bookkeeping only: the worker (``router.worker``) attempts what is ``ready``, and writes
to the store what ``admit`` and ``retried`` hand back.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Sequence

from router.store import Lease


class KeyQueue:
    def __init__(self) -> None:
        # Ready to attempt: the oldest of their key here or in flight, or keyless.
        self.ready: collections.deque[Lease] = collections.deque()
        # Key -> the deliveries of that key waiting behind the one ready or in flight
        # (a key is here exactly while one of its deliveries is ready or in flight).
        self._followers: dict[str, collections.deque[Lease]] = {}
        self.held = 0  # deliveries in ``_followers``
        # Key -> (the delivery waiting for its retry, when that is due): until that delivery is
        # leased again, later ones of its key go back (a lease may have been read before it).
        self._blocked: dict[str, tuple[int, float]] = {}

    def __len__(self) -> int:
        """Deliveries held in memory and not in flight."""
        return len(self.ready) + self.held

    def admit(self, leases: Sequence[Lease]) -> dict[float, list[Lease]]:
        """Take leased deliveries, oldest first. Returns those to give back to the store, by
        when they are due again (their key waits for a retry)."""
        ready, late = self.ready, dict[float, list[Lease]]()
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
            if followers is None:
                self._followers[key] = collections.deque()
                ready.append(lease)
                continue
            self.held += 1
            if followers and followers[-1].delivery_id > lease.delivery_id:  # a replayed dead letter
                bisect.insort(followers, lease, key=lambda waiting: waiting.delivery_id)
            else:
                followers.append(lease)
        return late

    def retried(self, lease: Lease, retry_at: float) -> list[Lease]:
        """``lease`` waits for a retry at ``retry_at``: its key's followers, to give back."""
        if lease.okey is None:
            return []
        self._blocked[lease.okey] = (lease.delivery_id, retry_at)
        followers = self._followers.pop(lease.okey, None)
        if not followers:
            return []
        self.held -= len(followers)
        return list(followers)

    def finished(self, lease: Lease) -> bool:
        """``lease`` is delivered or a dead letter (and written): the next of its key is ready.
        Returns whether one became ready."""
        key = lease.okey
        followers = self._followers.get(key) if key is not None else None
        if followers is None:  # keyless, or ended twice (after a bug)
            return False
        if not followers:
            del self._followers[key]  # type: ignore[arg-type]
            return False
        self.held -= 1
        self.ready.append(followers.popleft())
        return True
