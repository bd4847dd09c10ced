"""The SQL of the shared queue's operations, as functions of an asyncpg connection.

``postgres.PostgresStore`` runs them, the writes in its transactions (kept ones tried again
until the database takes them); the lease query, which keeps each key's order across routers,
is here with its parts.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import asyncpg

from router.store.base import DEAD, EVENT_COLUMNS, LEASED, PARKED, PENDING, Lease, counts_of, sink_state_of

CHANNEL = "router_due"
NOTIFY_MAX = 7900  # bytes of one NOTIFY payload (PostgreSQL allows 8000); more: "*" (every target)
_E = ", ".join(f"e.{c}" for c in EVENT_COLUMNS.split(", "))

# A delivery a router may lease now: due and waiting, or leased by a router that stopped renewing.
_LEASABLE = "((d.state = 0 AND d.due_at <= $2) OR (d.state = 1 AND d.lease_until <= $2))"
# ... and first of its key: nothing earlier of its target and key is waiting, leased or parked.
HEAD = (
    "(d.okey IS NULL OR NOT EXISTS (SELECT 1 FROM deliveries p WHERE p.target = d.target"
    " AND p.okey = d.okey AND p.state IN (0, 1, 3) AND p.id < d.id))"
)
# ... and, for a target with one attempt at a time, no delivery of it is leased by anyone.
TARGET_FREE = (
    " AND NOT EXISTS (SELECT 1 FROM deliveries q WHERE q.target = d.target AND q.state = 1"
    " AND q.lease_until > $2)"
)
# $1 target, $2 now, $3 limit, $4 this router, $5 until when the lease holds
LEASE = (
    "WITH picked AS (SELECT d.id FROM deliveries d WHERE d.target = $1 AND "
    + _LEASABLE
    + " AND "
    + HEAD
    + "{free} ORDER BY d.due_at, d.id LIMIT $3 FOR UPDATE SKIP LOCKED),"
    " leased AS (UPDATE deliveries d SET state = 1, leased_by = $4, lease_until = $5"
    " FROM picked WHERE d.id = picked.id RETURNING d.id, d.attempts, d.okey, d.event_id, d.due_at)"
    f" SELECT l.id, l.attempts, e.accepted_at, l.okey, {_E} FROM leased l"
    " JOIN events e ON e.id = l.event_id ORDER BY l.due_at, l.id"
)


async def notify(conn: asyncpg.Connection, targets: Sequence[str]) -> None:
    """Tell every router (at commit) that deliveries of ``targets`` may be leasable now."""
    if not targets:
        return
    payload = "\n".join(sorted(set(targets)))
    await conn.execute(
        "SELECT pg_notify($1, $2)", CHANNEL, payload if len(payload.encode()) <= NOTIFY_MAX else "*"
    )


# --- writes -------------------------------------------------------------------------------


async def insert_events(conn: asyncpg.Connection, rows: Sequence[Sequence[Any]]) -> set[str]:
    """Event rows (``base.event_row``); the ids inserted (the others were stored already)."""
    inserted = await conn.fetch(
        f"INSERT INTO events ({EVENT_COLUMNS}, accepted_at) SELECT * FROM unnest("
        "$1::text[], $2::text[], $3::text[], $4::bytea[], $5::text[], $6::text[], $7::text[],"
        " $8::text[], $9::text[], $10::float8[]) ON CONFLICT (id) DO NOTHING RETURNING id",
        *([row[n] for row in rows] for n in range(10)),
    )
    return {row[0] for row in inserted}


async def insert_deliveries(
    conn: asyncpg.Connection, event_ids: list[str], targets: list[str], keys: list[str | None], now: float
) -> None:
    """Pending deliveries, due now: one per (event id, target, ordering key)."""
    await conn.execute(
        "INSERT INTO deliveries (event_id, target, state, due_at, updated_at, okey)"
        " SELECT e, t, 0, $4, $4, k FROM unnest($1::text[], $2::text[], $3::text[]) AS u(e, t, k)",
        event_ids,
        targets,
        keys,
        now,
    )


async def save_checkpoint(conn: asyncpg.Connection, source: str, position: str) -> None:
    await conn.execute(
        "INSERT INTO checkpoints (source, position) VALUES ($1, $2)"
        " ON CONFLICT (source) DO UPDATE SET position = EXCLUDED.position",
        source,
        position,
    )


async def remember_ids(conn: asyncpg.Connection, ids: list[str], now: float, horizon: float) -> set[str]:
    """Adapter-sent ids, remembered from ``now``; those not remembered since ``horizon``."""
    fresh = await conn.fetch(
        "INSERT INTO seen_ids (id, at) SELECT unnest($1::text[]), $2 ON CONFLICT (id)"
        " DO UPDATE SET at = EXCLUDED.at WHERE seen_ids.at < $3 RETURNING id",
        ids,
        now,
        horizon,
    )
    return {row[0] for row in fresh}


async def delete_acked(conn: asyncpg.Connection, ids: list[int], event_ids: list[str]) -> None:
    """Delivered: the deliveries, their errors, and their events once no delivery needs them."""
    await conn.execute("DELETE FROM deliveries WHERE id = ANY($1::bigint[])", ids)
    await conn.execute("DELETE FROM attempt_errors WHERE delivery_id = ANY($1::bigint[])", ids)
    await conn.execute(
        "DELETE FROM events WHERE id = ANY($1::text[])"
        " AND NOT EXISTS (SELECT 1 FROM deliveries WHERE event_id = events.id)",
        event_ids,
    )


async def fail(conn: asyncpg.Connection, lease: Lease, state: int, due_at: float, error: str) -> None:
    """A failed attempt: the delivery ``state`` (pending again, or dead) due at ``due_at``,
    with ``error`` kept as the attempt's."""
    attempts, now = lease.attempts + 1, time.time()
    await conn.execute(
        "UPDATE deliveries SET state = $1, due_at = $2, attempts = $3, last_error = $4,"
        " updated_at = $5, leased_by = NULL WHERE id = $6",
        state,
        due_at,
        attempts,
        error,
        now,
        lease.delivery_id,
    )
    await conn.execute(
        "INSERT INTO attempt_errors (delivery_id, attempt, at, error) VALUES ($1, $2, $3, $4)",
        lease.delivery_id,
        attempts,
        now,
        error,
    )


async def hold(conn: asyncpg.Connection, ids: list[int], until: float) -> None:
    await conn.execute(
        "UPDATE deliveries SET state = 0, due_at = GREATEST(due_at, $2), leased_by = NULL"
        " WHERE state = $3 AND id = ANY($1::bigint[])",
        ids,
        until,
        LEASED,
    )


async def kill_target(conn: asyncpg.Connection, target: str, error: str) -> int:
    status = await conn.execute(
        "UPDATE deliveries SET state = $1, last_error = $2, updated_at = $3 WHERE target = $4 AND state = 0",
        DEAD,
        error,
        time.time(),
        target,
    )
    return int(status.split()[-1])


async def probe(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "INSERT INTO probe (id, at) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET at = EXCLUDED.at",
        time.time(),
    )


# --- reads --------------------------------------------------------------------------------


async def next_due(conn: asyncpg.Connection, target: str, node: str) -> float | None:
    """When the next delivery of ``target`` router ``node`` could lease falls due: the first of
    a key waiting for its retry, or a lease another router holds running out."""
    due = await conn.fetchval(
        "SELECT MIN(CASE WHEN d.state = 0 THEN d.due_at ELSE d.lease_until END) FROM deliveries d"
        f" WHERE d.target = $1 AND (d.state = 0 OR (d.state = 1 AND d.leased_by != $2)) AND {HEAD}",
        target,
        node,
    )
    return None if due is None else float(due)


async def pending_targets(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT DISTINCT target FROM deliveries WHERE state = 0 OR (state = 1 AND lease_until <= $1)",
        time.time(),
    )
    return {row[0] for row in rows}


async def checkpoint(conn: asyncpg.Connection, source: str) -> str | None:
    value = await conn.fetchval("SELECT position FROM checkpoints WHERE source = $1", source)
    return None if value is None else str(value)


async def sink_state(conn: asyncpg.Connection) -> dict[str, tuple[int, int, float | None]]:
    now = time.time()
    rows: Any = await conn.fetch(
        "SELECT split_part(d.target, ':', 1), d.state = $1, COUNT(*), MIN(e.accepted_at)"
        " FROM deliveries d JOIN events e ON e.id = d.event_id GROUP BY 1, 2",
        DEAD,
    )
    return sink_state_of(rows, now)


async def due_or_leased(conn: asyncpg.Connection, due: float) -> int:
    count = await conn.fetchval(
        "SELECT COUNT(*) FROM deliveries WHERE state IN ($1, $2) OR (state = $3 AND due_at <= $4)",
        LEASED,
        PARKED,
        PENDING,
        due,
    )
    return int(count)


async def counts(conn: asyncpg.Connection) -> dict[str, int]:
    rows = await conn.fetch("SELECT state, COUNT(*) FROM deliveries GROUP BY state")
    return counts_of({row[0]: row[1] for row in rows})
