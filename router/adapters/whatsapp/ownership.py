"""Which router runs which live WhatsApp session, when several share one PostgreSQL database.

A session runs on the router that holds its advisory lock (``pg_try_advisory_lock`` on the key
``whatsapp:<instance>``), taken on one connection this router keeps open for them all. The lock
goes with that connection: when a router dies (or loses the database), PostgreSQL releases its
locks, every router's next round (``ROUND_S``) tries them, and one of the others takes each
session over. A router that loses its connection stops its sessions at once, so no session ever
runs twice.

A session's credentials (its neonize database file) go with it: the owner copies the file into
the database (``whatsapp_sessions``) every ``SAVE_EVERY_S`` and when the session stops, and the
router that takes a session over writes the latest copy where its session will read it. A
router that dies loses at most the last ``SAVE_EVERY_S`` of the file's changes; the device
stays paired.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import asyncpg

from router import instance_files, logs
from router.redact import redact_url
from router.store.pg_schema import DATABASE_ERRORS

log = logs.get_logger("router.whatsapp")
ROUND_S = 2.0  # how often sessions nobody runs are looked for
SAVE_EVERY_S = 30.0  # how often a running session's credential file is copied to the database


class SessionOwnership:
    def __init__(self, url: str, on_lost: Callable[[], None]) -> None:
        self.url = url
        self.on_lost = on_lost  # the connection went: every session must stop here
        self.held: set[str] = set()
        self.rounds = 0  # claim rounds made (for tests and curiosity)
        self._conn: asyncpg.Connection | None = None

    async def claim(self, names: Iterable[str]) -> set[str]:
        """Take the sessions among ``names`` no router runs; returns every session held here."""
        self.rounds += 1
        wanted = [name for name in names if name not in self.held]
        if not wanted:
            return set(self.held)
        try:
            conn = await self._connection()
            for name in wanted:
                if await conn.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, 0))", _key(name)):
                    self.held.add(name)
                    log.info("whatsapp.session_owned", instance=name)
        except DATABASE_ERRORS as exc:
            log.error("whatsapp.ownership_failed", database=redact_url(self.url), error=str(exc))
        return set(self.held)

    async def release(self, name: str) -> None:
        if name in self.held and self._conn is not None and not self._conn.is_closed():
            with contextlib.suppress(*DATABASE_ERRORS):
                await self._conn.fetchval("SELECT pg_advisory_unlock(hashtextextended($1, 0))", _key(name))
        self.held.discard(name)

    async def fetch(self, name: str, path: Path) -> None:
        """The session's latest credential file, written at ``path`` (nothing stored: left as is)."""
        try:
            conn = await self._connection()
            stored = await conn.fetchval("SELECT db FROM whatsapp_sessions WHERE name = $1", name)
        except DATABASE_ERRORS as exc:
            log.error("whatsapp.credentials_unavailable", instance=name, error=str(exc))
            return
        if stored is not None:
            await asyncio.to_thread(_write_database, path, bytes(stored))

    async def save(self, name: str, path: Path) -> None:
        """A consistent copy of the session's credential file into the database (if held here)."""
        if name not in self.held or not path.exists():
            return
        try:
            copy = await asyncio.to_thread(_snapshot, path)
            conn = await self._connection()
            await conn.execute(
                "INSERT INTO whatsapp_sessions (name, db, updated_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (name) DO UPDATE SET db = EXCLUDED.db, updated_at = EXCLUDED.updated_at",
                name,
                copy,
                time.time(),
            )
        except (sqlite3.Error, *DATABASE_ERRORS) as exc:
            log.error("whatsapp.credentials_not_saved", instance=name, error=str(exc))

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(self.url)
            self._conn.add_termination_listener(self._terminated)
        return self._conn

    def _terminated(self, _: object) -> None:
        if self.held:
            log.error("whatsapp.ownership_lost", sessions=sorted(self.held), hint="stopped here; taken over")
        self.held.clear()
        self.on_lost()

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(Exception):
                await conn.close()
        self.held.clear()


def _key(name: str) -> str:
    return f"whatsapp:{name}"


def _snapshot(path: Path) -> bytes:
    """The SQLite file at ``path`` as one consistent copy (SQLite's backup, WAL included)."""
    with tempfile.TemporaryDirectory() as directory:
        copy = Path(directory, "copy.db")
        source, target = sqlite3.connect(path), sqlite3.connect(copy)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()
        return copy.read_bytes()


def _write_database(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for stale in (Path(f"{path}-wal"), Path(f"{path}-shm")):  # of an older copy: not of this one
        stale.unlink(missing_ok=True)
    instance_files.write_atomically(path, data)
