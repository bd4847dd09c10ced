"""The durable queue: ``base`` says what a store is; ``sqlite`` and ``postgres`` are the two."""

from router.store.base import DEAD, LEASED, PARKED, PENDING, Accepted, Lease, NewDelivery, QueueStore, Wake
from router.store.sqlite import SqliteStore

Store = SqliteStore  # the embedded default, by its earlier name

__all__ = [
    "DEAD",
    "LEASED",
    "PARKED",
    "PENDING",
    "Accepted",
    "Lease",
    "NewDelivery",
    "QueueStore",
    "SqliteStore",
    "Store",
    "Wake",
]
