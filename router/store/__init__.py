"""The durable queue: ``base`` says what a store is; ``sqlite`` and ``postgres`` are the two."""

import sqlite3

from router.store.base import DEAD, LEASED, PARKED, PENDING, Accepted, Lease, NewDelivery, QueueStore, Wake
from router.store.pg_schema import DATABASE_ERRORS
from router.store.sqlite import SqliteStore

Store = SqliteStore  # the embedded default, by its earlier name
# What a store's read or write raises when its database cannot serve it (besides RouterError).
STORE_ERRORS = (sqlite3.Error, *DATABASE_ERRORS)

__all__ = [
    "DEAD",
    "LEASED",
    "PARKED",
    "PENDING",
    "STORE_ERRORS",
    "Accepted",
    "Lease",
    "NewDelivery",
    "QueueStore",
    "SqliteStore",
    "Store",
    "Wake",
]
