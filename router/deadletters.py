"""Dead letters from the command line: list, show, replay and purge.

These work on the queue database directly, with their own connection, so they run while the
daemon runs (SQLite in WAL mode; a busy database is waited for). Replay makes a dead delivery
pending again, due now, with its attempt count reset: the daemon notices the other writer
within ``EXTERNAL_POLL_S``, wakes its workers, and the delivery goes through the normal retry
path. Every earlier attempt's error is kept.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from router.errors import ConfigError
from router.events import Event, envelope
from router.store import DEAD, PENDING


@dataclass(frozen=True)
class Selection:
    """Which dead letters: by delivery id, or by instance, sink, event and time (all optional)."""

    ids: tuple[int, ...] = ()
    instance: str | None = None
    sink: str | None = None
    event: str | None = None
    since: float | None = None  # died at or after (unix time)
    until: float | None = None  # died before

    @property
    def narrows(self) -> bool:
        return bool(self.ids) or any(
            value is not None for value in (self.instance, self.sink, self.event, self.since, self.until)
        )

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = ["d.state = ?"]
        params: list[Any] = [DEAD]
        if self.ids:
            clauses.append(f"d.id IN ({','.join('?' * len(self.ids))})")
            params += list(self.ids)
        if self.instance is not None:
            clauses.append("e.instance = ?")
            params.append(self.instance)
        if self.sink is not None:
            clauses.append("d.target LIKE ? ESCAPE '\\'")
            params.append(self.sink.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + ":%")
        if self.event is not None:
            clauses.append("e.event = ?")
            params.append(self.event)
        if self.since is not None:
            clauses.append("d.updated_at >= ?")
            params.append(self.since)
        if self.until is not None:
            clauses.append("d.updated_at < ?")
            params.append(self.until)
        return " AND ".join(clauses), params


def parse_time(text: str) -> float:
    """Unix seconds, or an ISO-8601 time (``2026-11-24T10:00:00Z``; without a zone: UTC)."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ConfigError(
            [f"not a time: {text!r} (use ISO-8601, e.g. 2026-11-24T10:00:00Z, or unix seconds)"]
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@contextmanager
def connect(path: Path) -> Iterator[sqlite3.Connection]:
    if not path.exists():
        raise ConfigError([f"no queue database at {path} (has the daemon run with this ROUTER_STATE_DIR?)"])
    conn = sqlite3.connect(path, timeout=10, isolation_level=None)
    conn.row_factory = sqlite3.Row
    try:
        yield conn
    finally:
        conn.close()


_COLUMNS = (
    "SELECT d.id, d.event_id, d.target, d.attempts, d.last_error, d.updated_at, e.instance, e.event"
    " FROM deliveries d JOIN events e ON e.id = d.event_id"
)


_SELECTED = "SELECT d.id, d.event_id FROM deliveries d JOIN events e ON e.id = d.event_id"


def pending_by_target(path: Path) -> dict[str, int]:
    """Deliveries waiting (not dead), by target."""
    with connect(path) as conn:
        rows = conn.execute(
            "SELECT target, COUNT(*) FROM deliveries WHERE state != ? GROUP BY target", (DEAD,)
        )
        return {row[0]: int(row[1]) for row in rows}


def dead_letters(path: Path, selection: Selection | None = None) -> list[dict[str, Any]]:
    """The selected dead letters (all of them by default), oldest first."""
    where, params = (selection or Selection()).where()
    with connect(path) as conn:
        return [dict(row) for row in conn.execute(f"{_COLUMNS} WHERE {where} ORDER BY d.id", params)]


def show(path: Path, delivery_id: int) -> dict[str, Any]:
    """One dead letter: its delivery, the envelope and every attempt's error."""
    with connect(path) as conn:
        row = conn.execute(f"{_COLUMNS} WHERE d.id = ? AND d.state = ?", (delivery_id, DEAD)).fetchone()
        if row is None:
            raise ConfigError([f"no dead letter with id {delivery_id}"])
        stored = conn.execute("SELECT * FROM events WHERE id = ?", (row["event_id"],)).fetchone()
        attempts = conn.execute(
            "SELECT attempt, at, error FROM attempt_errors WHERE delivery_id = ? ORDER BY attempt, at",
            (delivery_id,),
        ).fetchall()
    event = Event(
        id=stored["id"],
        instance=stored["instance"],
        event=stored["event"],
        data=bytes(stored["data"]),
        date_time=stored["date_time"],
        sender=stored["sender"],
        server_url=stored["server_url"],
        apikey=stored["apikey"],
    )
    body = envelope(event, server_url=event.server_url, apikey=event.apikey)
    return {**dict(row), "envelope": body.decode(), "errors": [dict(a) for a in attempts]}


def replay(path: Path, selection: Selection) -> int:
    """Make the selected dead letters pending again, due now; returns how many."""
    where, params = selection.where()
    now = time.time()
    with connect(path) as conn:
        conn.execute("BEGIN IMMEDIATE")
        ids = [r[0] for r in conn.execute(f"{_SELECTED} WHERE {where}", params)]
        for chunk in _chunks(ids):
            conn.execute(
                f"UPDATE deliveries SET state = ?, due_at = ?, attempts = 0, updated_at = ?"
                f" WHERE id IN ({','.join('?' * len(chunk))})",
                [PENDING, now, now, *chunk],
            )
        conn.execute("COMMIT")
    return len(ids)


def purge(path: Path, selection: Selection) -> int:
    """Delete the selected dead letters (and events nothing else waits for); returns how many."""
    where, params = selection.where()
    with connect(path) as conn:
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute(f"{_SELECTED} WHERE {where}", params).fetchall()
        for chunk in _chunks([r[0] for r in rows]):
            marks = ",".join("?" * len(chunk))
            conn.execute(f"DELETE FROM attempt_errors WHERE delivery_id IN ({marks})", chunk)
            conn.execute(f"DELETE FROM deliveries WHERE id IN ({marks})", chunk)
        for chunk in _chunks(sorted({r[1] for r in rows})):
            conn.execute(
                f"DELETE FROM events WHERE id IN ({','.join('?' * len(chunk))})"
                " AND NOT EXISTS (SELECT 1 FROM deliveries WHERE event_id = events.id)",
                chunk,
            )
        conn.execute("COMMIT")
    return len(rows)


def _chunks(values: Sequence[Any], size: int = 500) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
