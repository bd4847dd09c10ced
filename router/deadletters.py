"""Dead letters from the command line: list, show, replay and purge.

These work on the queue database directly, with their own connection, so they run while the
daemon runs: the SQLite file (WAL mode; a busy database is waited for) or the shared PostgreSQL
database (``ROUTER_DATABASE_URL``; the routers are told by NOTIFY). Replay makes a dead delivery
pending again, due now, with its attempt count reset: the daemon notices the other writer
within ``EXTERNAL_POLL_S``, wakes its workers, and the delivery goes through the normal retry
path. Every earlier attempt's error is kept.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from router.errors import ConfigError
from router.events import Event, envelope
from router.redact import redact_url
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


class NoQueue(ConfigError):
    """No router has made the queue there yet."""


class _Sqlite:
    """The SQLite queue file, with its own connection."""

    notify_sql: str | None = None

    def __init__(self, path: Path) -> None:
        if not path.exists():
            raise NoQueue([f"no queue database at {path} (has the daemon run with this ROUTER_STATE_DIR?)"])
        self.conn = sqlite3.connect(path, timeout=10, isolation_level=None)
        self.conn.row_factory = sqlite3.Row

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        sql = "BEGIN IMMEDIATE" if sql == "BEGIN" else sql  # the write lock at once: no upgrade deadlock
        return [dict(row) for row in self.conn.execute(sql, params)]

    def close(self) -> None:
        self.conn.close()


class _Postgres:
    """The shared PostgreSQL queue, through asyncpg on a thread of its own (so these functions
    work from the command line and from inside a running event loop alike)."""

    notify_sql = "SELECT pg_notify('router_due', '*')"  # every router's workers look again

    def __init__(self, url: str) -> None:
        import asyncpg  # noqa: PLC0415 - only for PostgreSQL

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="dlq")
        self._thread.start()
        try:
            self.conn = self._call(asyncpg.connect(url))
            made = self._call(self.conn.fetchval("SELECT to_regclass('deliveries') IS NOT NULL"))
        except Exception as exc:
            self._stop()
            raise ConfigError([f"ROUTER_DATABASE_URL: cannot use {redact_url(url)}: {exc}"]) from exc
        if not made:
            self.close()
            hint = "has a router run with this ROUTER_DATABASE_URL?"
            raise NoQueue([f"no queue in the database {redact_url(url)} ({hint})"])

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        numbered = iter(range(1, len(params) + 1))
        sql = re.sub(r"\?", lambda _: f"${next(numbered)}", sql)
        return [dict(row) for row in self._call(self.conn.fetch(sql, *params))]

    def close(self) -> None:
        self._call(self.conn.close())
        self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


Where = Path | str  # the SQLite file, or a postgresql:// URL


@contextmanager
def connect(where: Where) -> Iterator[_Sqlite | _Postgres]:
    """The queue at ``where``; NoQueue if no router has made it there yet."""
    db = _Postgres(where) if isinstance(where, str) else _Sqlite(where)
    try:
        yield db
    finally:
        db.close()


_COLUMNS = (
    "SELECT d.id, d.event_id, d.target, d.attempts, d.last_error, d.updated_at, e.instance, e.event"
    " FROM deliveries d JOIN events e ON e.id = d.event_id"
)


_SELECTED = "SELECT d.id, d.event_id FROM deliveries d JOIN events e ON e.id = d.event_id"


def pending_by_target(where: Where) -> dict[str, int]:
    """Deliveries waiting (not dead), by target; none where no queue was made yet."""
    try:
        with connect(where) as db:
            rows = db.rows(
                "SELECT target, COUNT(*) AS n FROM deliveries WHERE state != ? GROUP BY target", (DEAD,)
            )
    except NoQueue:
        return {}
    return {row["target"]: int(row["n"]) for row in rows}


def dead_letters(where: Where, selection: Selection | None = None) -> list[dict[str, Any]]:
    """The selected dead letters (all of them by default), oldest first."""
    clause, params = (selection or Selection()).where()
    with connect(where) as db:
        return db.rows(f"{_COLUMNS} WHERE {clause} ORDER BY d.id", params)


def show(where: Where, delivery_id: int) -> dict[str, Any]:
    """One dead letter: its delivery, the envelope and every attempt's error."""
    with connect(where) as db:
        found = db.rows(f"{_COLUMNS} WHERE d.id = ? AND d.state = ?", (delivery_id, DEAD))
        if not found:
            raise ConfigError([f"no dead letter with id {delivery_id}"])
        row = found[0]
        [stored] = db.rows("SELECT * FROM events WHERE id = ?", (row["event_id"],))
        attempts = db.rows(
            "SELECT attempt, at, error FROM attempt_errors WHERE delivery_id = ? ORDER BY attempt, at",
            (delivery_id,),
        )
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
    return {**row, "envelope": body.decode(), "errors": attempts}


def replay(where: Where, selection: Selection) -> int:
    """Make the selected dead letters pending again, due now; returns how many."""
    clause, params = selection.where()
    now = time.time()
    with connect(where) as db:
        db.rows("BEGIN")
        ids = [r["id"] for r in db.rows(f"{_SELECTED} WHERE {clause}", params)]
        for chunk in _chunks(ids):
            db.rows(
                f"UPDATE deliveries SET state = ?, due_at = ?, attempts = 0, updated_at = ?"
                f" WHERE id IN ({','.join('?' * len(chunk))})",
                [PENDING, now, now, *chunk],
            )
        if db.notify_sql and ids:
            db.rows(db.notify_sql)
        db.rows("COMMIT")
    return len(ids)


def purge(where: Where, selection: Selection) -> int:
    """Delete the selected dead letters (and events nothing else waits for); returns how many."""
    clause, params = selection.where()
    with connect(where) as db:
        db.rows("BEGIN")
        rows = db.rows(f"{_SELECTED} WHERE {clause}", params)
        for chunk in _chunks([r["id"] for r in rows]):
            marks = ",".join("?" * len(chunk))
            db.rows(f"DELETE FROM attempt_errors WHERE delivery_id IN ({marks})", chunk)
            db.rows(f"DELETE FROM deliveries WHERE id IN ({marks})", chunk)
        for chunk in _chunks(sorted({r["event_id"] for r in rows})):
            db.rows(
                f"DELETE FROM events WHERE id IN ({','.join('?' * len(chunk))})"
                " AND NOT EXISTS (SELECT 1 FROM deliveries WHERE event_id = events.id)",
                chunk,
            )
        db.rows("COMMIT")
    return len(rows)


def _chunks(values: Sequence[Any], size: int = 500) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
