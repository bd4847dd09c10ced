"""The SQL of the durable queue's plainer operations, as functions of a connection.

``sqlite.SqliteStore`` runs them on its writer's thread (``sqlite_writer``); what needs the
store's own state (accepting with deduplication, leasing, retries that hold back a key) stays
there.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from router.store.base import DEAD, LEASED, PARKED, PENDING, Lease, counts_of, sink_state_of
from router.store.sqlite_writer import Op

MAX_VARIABLES = 10_000  # per statement; SQLite allows 32766
ROWS_PER_INSERT = 100  # rows one INSERT statement writes (insert_rows)


def by_ids(conn: sqlite3.Connection, sql: str, params: Sequence[Any], ids: Sequence[int | str]) -> None:
    """``sql`` (with ``{marks}`` for the ids) for ``ids``, as many statements as variables allow."""
    for start in range(0, len(ids), MAX_VARIABLES):
        chunk = ids[start : start + MAX_VARIABLES]
        conn.execute(sql.format(marks=",".join("?" * len(chunk))), [*params, *chunk])


def insert_rows(conn: sqlite3.Connection, head: str, rows: Sequence[Sequence[Any]]) -> None:
    """``head`` (``INSERT ... (columns) VALUES``) for ``rows``, a hundred rows per statement.

    Not ``executemany``: it gives the interpreter lock up and takes it back for every row, and
    with the event loop busy each take waits for it; one statement per hundred rows does so once."""
    if not rows:
        return
    width = len(rows[0])
    one = "(" + ",".join("?" * width) + ")"
    for start in range(0, len(rows), ROWS_PER_INSERT):
        chunk = rows[start : start + ROWS_PER_INSERT]
        conn.execute(f"{head} {','.join([one] * len(chunk))}", [value for row in chunk for value in row])


# --- writes -------------------------------------------------------------------------------


def ack_op(acks: list[Lease]) -> Op:
    """Delete delivered deliveries, and their events once no delivery needs them."""

    def op(conn: sqlite3.Connection) -> None:
        by_ids(conn, "DELETE FROM deliveries WHERE id IN ({marks})", (), [a.delivery_id for a in acks])
        # Handed over, never attempted, their event's only delivery (most, under a burst):
        # the event goes with it, with nothing else to look for.
        by_ids(conn, "DELETE FROM events WHERE id IN ({marks})", (), [a.event.id for a in acks if a.sole])
        others = [a for a in acks if not a.sole]
        # A replayed delivery starts its count again but keeps its errors: delete by id.
        ids = [a.delivery_id for a in others]
        by_ids(conn, "DELETE FROM attempt_errors WHERE delivery_id IN ({marks})", (), ids)
        by_ids(
            conn,
            "DELETE FROM events WHERE id IN ({marks})"
            " AND NOT EXISTS (SELECT 1 FROM deliveries WHERE event_id = events.id)",
            (),
            list({a.event.id for a in others}),
        )

    return op


def fail_op(lease: Lease, state: int, due_at: float, error: str) -> Op:
    """A failed attempt: the delivery ``state`` (pending again, or dead) due at ``due_at``,
    with ``error`` kept as the attempt's."""
    attempts = lease.attempts + 1

    def op(conn: sqlite3.Connection) -> None:
        now = time.time()
        conn.execute(
            "UPDATE deliveries SET state = ?, due_at = ?, attempts = ?, last_error = ?,"
            " updated_at = ? WHERE id = ?",
            (state, due_at, attempts, error, now, lease.delivery_id),
        )
        conn.execute(
            "INSERT INTO attempt_errors (delivery_id, attempt, at, error) VALUES (?, ?, ?, ?)",
            (lease.delivery_id, attempts, now, error),
        )

    return op


def hold_back_key(conn: sqlite3.Connection, lease: Lease, due_at: float) -> None:
    """The later deliveries of ``lease``'s ordering key: due no sooner than ``due_at``."""
    conn.execute(
        "UPDATE deliveries SET state = ?, due_at = ? WHERE target = ? AND okey = ? AND id > ?"
        " AND state IN (?, ?, ?) AND (due_at < ? OR state != ?)",
        (
            PENDING,
            due_at,
            lease.target,
            lease.okey,
            lease.delivery_id,
            PENDING,
            LEASED,
            PARKED,
            due_at,
            PENDING,
        ),
    )


def park(conn: sqlite3.Connection, ids: Sequence[int]) -> None:
    by_ids(conn, "UPDATE deliveries SET state = ? WHERE state = ? AND id IN ({marks})", (PARKED, LEASED), ids)


def unpark(conn: sqlite3.Connection, target: str, key: str, limit: int) -> int | None:
    """The oldest ``limit`` parked deliveries of ``key`` pending again; the id of the oldest
    still parked (None: none is)."""
    rows = conn.execute(
        "SELECT id FROM deliveries WHERE target = ? AND okey = ? AND state = ? ORDER BY id LIMIT ?",
        (target, key, PARKED, limit + 1),
    ).fetchall()
    by_ids(
        conn,
        "UPDATE deliveries SET state = ? WHERE id IN ({marks})",
        (PENDING,),
        [r[0] for r in rows[:limit]],
    )
    return rows[limit][0] if len(rows) > limit else None


def hold(conn: sqlite3.Connection, ids: Sequence[int], until: float) -> None:
    sql = "UPDATE deliveries SET state = ?, due_at = MAX(due_at, ?) WHERE state = ? AND id IN ({marks})"
    by_ids(conn, sql, (PENDING, until, LEASED), ids)


def kill_target(conn: sqlite3.Connection, target: str, error: str) -> int:
    cursor = conn.execute(
        "UPDATE deliveries SET state = ?, last_error = ?, updated_at = ? WHERE target = ? AND state = ?",
        (DEAD, error, time.time(), target, PENDING),
    )
    return cursor.rowcount


def probe(conn: sqlite3.Connection) -> None:
    conn.execute("INSERT OR REPLACE INTO probe (id, at) VALUES (1, ?)", (time.time(),))


# --- reads --------------------------------------------------------------------------------


def next_due(conn: sqlite3.Connection, target: str) -> float | None:
    row = conn.execute(
        "SELECT MIN(due_at) FROM deliveries WHERE target = ? AND state = ?", (target, PENDING)
    ).fetchone()
    return None if row is None else row[0]


def pending_targets(conn: sqlite3.Connection) -> set[str]:
    rows = conn.execute("SELECT DISTINCT target FROM deliveries WHERE state = ?", (PENDING,))
    return {row[0] for row in rows}


def checkpoint(conn: sqlite3.Connection, source: str) -> str | None:
    row = conn.execute("SELECT position FROM checkpoints WHERE source = ?", (source,)).fetchone()
    return None if row is None else str(row[0])


def sink_state(conn: sqlite3.Connection) -> dict[str, tuple[int, int, float | None]]:
    now = time.time()
    rows = conn.execute(
        "SELECT substr(d.target, 1, instr(d.target, ':') - 1), d.state = ?, COUNT(*),"
        " MIN(e.accepted_at) FROM deliveries d JOIN events e ON e.id = d.event_id GROUP BY 1, 2",
        (DEAD,),
    )
    return sink_state_of(rows, now)


def due_or_leased(conn: sqlite3.Connection, due: float) -> int:
    row = conn.execute(
        "SELECT COUNT(*) FROM deliveries WHERE state IN (?, ?) OR (state = ? AND due_at <= ?)",
        (LEASED, PARKED, PENDING, due),
    ).fetchone()
    return int(row[0])


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    return counts_of(dict(conn.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state")))
