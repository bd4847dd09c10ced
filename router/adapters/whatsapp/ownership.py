"""Which router runs which live WhatsApp session, when several share one PostgreSQL database.

A session runs on the router that holds its advisory lock (``pg_try_advisory_lock`` on the key
``whatsapp:<instance>``), taken on one connection this router keeps open for them all. The lock
goes with that connection: when a router dies (or loses the database), PostgreSQL releases its
locks, every router's next round (``ROUND_S``) tries them, and one of the others takes each
session over. A router that loses its connection stops its sessions at once, so no session ever
runs twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import asyncpg

from router import logs
from router.redact import redact_url

log = logs.get_logger("router.whatsapp")
ROUND_S = 2.0  # how often sessions nobody runs are looked for


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
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.error("whatsapp.ownership_failed", database=redact_url(self.url), error=str(exc))
        return set(self.held)

    async def release(self, name: str) -> None:
        if name in self.held and self._conn is not None and not self._conn.is_closed():
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                await self._conn.fetchval("SELECT pg_advisory_unlock(hashtextextended($1, 0))", _key(name))
        self.held.discard(name)

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
