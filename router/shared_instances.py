"""Instance configuration shared by every router through PostgreSQL (``ROUTER_DATABASE_URL``).

The ``instances`` table holds each instance file's text, by file name. Each router keeps its
``ROUTER_INSTANCES_DIR`` as a mirror of the table and goes on loading instances from files as it
always does:

- **down**: when another router changed the table (``NOTIFY router_instances``), this router
  writes the changed files, removes the deleted ones and reloads, within the notification's time.
  It reads only what changed since it last looked: a trigger logs every changed name
  (``instance_changes``, kept an hour), whoever writes the table. The whole table is read at
  start, after the connection was lost, and by a pull ``FULL_READ_S`` after the last such read;
- **up**: after each reload (the admin API's writes, an operator's edit), files that differ from
  what the table held (only files whose size or time changed are read) are written to it,
  removed files are deleted from it, and the other routers are notified. A change the database
  could not take is tried again until it does, and nothing is taken from the table over it
  meanwhile.

At start the table wins (a router that was down catches up, deleted instances stay deleted),
except when the table is empty: then this router's files are its first content.
``import_directory`` and ``export_directory`` are ``evolution-router instances import|export``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import asyncpg

from router import instance_files, logs
from router.instances import file_stamps
from router.instances import instance_files as list_instance_files
from router.redact import redact_url
from router.store.pg_schema import DATABASE_ERRORS, INSTANCES_LOCK, migrate

log = logs.get_logger("router.shared_instances")
CHANNEL = "router_instances"
CHECK_S = 5.0  # how often an idle router checks that its connection (and so its listening) holds
FULL_READ_S = 600.0  # a pull this long after the last whole-table read reads the whole table
CHANGES_KEPT_S = 3600.0  # the change log's horizon (more than FULL_READ_S: nothing is missed)


def read_directory(directory: Path) -> dict[str, str]:
    """File name -> text of every instance file in ``directory``."""
    return read_files(directory, [path.name for path in list_instance_files(directory)])


def read_files(directory: Path, names: list[str]) -> dict[str, str]:
    """File name -> text of the files ``names`` of ``directory`` that are there."""
    texts = {}
    for name in names:
        with contextlib.suppress(OSError):  # removed meanwhile
            texts[name] = (directory / name).read_text(encoding="utf-8")
    return texts


async def _rows(conn: asyncpg.Connection) -> dict[str, str]:
    return {row[0]: row[1] for row in await conn.fetch("SELECT name, yaml FROM instances")}


async def _read_all(conn: asyncpg.Connection) -> tuple[int, dict[str, str]]:
    """The last change logged, then the whole table (a change between the two is read again)."""
    seen = int(await conn.fetchval("SELECT COALESCE(MAX(seq), 0) FROM instance_changes"))
    return seen, await _rows(conn)


async def _changes_since(conn: asyncpg.Connection, seen: int) -> tuple[int, dict[str, str | None]]:
    """The instances changed after change ``seen``: name -> its text now (None: deleted), and
    the last change read."""
    rows = await conn.fetch(
        "SELECT c.seq, c.name, i.yaml FROM instance_changes c LEFT JOIN instances i ON i.name = c.name"
        " WHERE c.seq > $1 ORDER BY c.seq",
        seen,
    )
    return (rows[-1][0], {row[1]: row[2] for row in rows}) if rows else (seen, {})


async def _write_rows(conn: asyncpg.Connection, upserts: dict[str, str], deletes: set[str]) -> None:
    """One transaction: the table changed as said, and every router told."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", INSTANCES_LOCK)  # before any row lock
        now = time.time()
        if upserts:
            await conn.executemany(
                "INSERT INTO instances (name, yaml, updated_at) VALUES ($1, $2, $3)"
                " ON CONFLICT (name) DO UPDATE SET yaml = EXCLUDED.yaml, updated_at = EXCLUDED.updated_at",
                [(name, text, now) for name, text in upserts.items()],
            )
        if deletes:
            await conn.execute("DELETE FROM instances WHERE name = ANY($1::text[])", sorted(deletes))
        await conn.execute(
            "DELETE FROM instance_changes WHERE at < extract(epoch FROM clock_timestamp()) - $1",
            CHANGES_KEPT_S,
        )
        await conn.execute("SELECT pg_notify($1, '')", CHANNEL)


def _mirror(directory: Path, wanted: Mapping[str, str | None], have: dict[str, str] | None = None) -> bool:
    """Make ``directory`` hold ``wanted`` (None: no such file), given the texts its files have
    (by default, read for the names in ``wanted``); a file in ``have`` but not in ``wanted`` is
    removed. True if a file changed."""
    if have is None:
        have = read_files(directory, list(wanted))
    changed = False
    for name, text in wanted.items():
        if have.get(name) == text:
            continue
        if text is None:
            with contextlib.suppress(FileNotFoundError):
                instance_files.remove(directory / name)
        else:
            instance_files.write_atomically(directory / name, text)
        changed = True
    for name in have.keys() - wanted.keys():
        with contextlib.suppress(FileNotFoundError):
            instance_files.remove(directory / name)
        changed = True
    return changed


def _changed_files(
    directory: Path, known: dict[str, tuple[int, int]]
) -> tuple[dict[str, tuple[int, int]], dict[str, str]]:
    """The stamps of ``directory``'s files, and the text of those whose stamp is not as ``known``
    (a file gone before it was read has no stamp either)."""
    stamps = file_stamps(directory)
    changed = [name for name, stamp in stamps.items() if known.get(name) != stamp]
    texts = read_files(directory, changed)
    for name in changed:
        if name not in texts:
            del stamps[name]
    return stamps, texts


class SharedInstances:
    """Keeps ``directory`` and the database's ``instances`` table the same, both ways."""

    def __init__(self, url: str, directory: Path, reload: Callable[[], Awaitable[None]]) -> None:
        self.url = url
        self.directory = directory
        self._reload = reload  # the daemon's reload, under its configuration lock
        self._conn: asyncpg.Connection | None = None
        self._known: dict[str, str] = {}  # the table as last read or written by this router
        self._pulls = asyncio.Event()
        self._lock = asyncio.Lock()  # one statement at a time on the connection
        self._unpushed = False  # the files hold a change the database has not taken yet
        self._seen = 0  # the last change of the log this router has read
        # File name -> its (mtime, size) when it last held what ``_known`` has for it: a push
        # reads only the files whose stamp changed.
        self._stamps: dict[str, tuple[int, int]] = {}
        self._read_all_at: float | None = None  # when it last read the whole table (monotonic)

    async def start(self) -> bool:
        """Connect and make the directory and the table agree; True if the files changed."""
        conn = await self._connection()
        await migrate(conn)
        self._seen, table = await _read_all(conn)
        self._read_all_at = time.monotonic()
        files = await asyncio.to_thread(read_directory, self.directory)
        if not table and files:
            await _write_rows(conn, files, set())
            self._known = files
            log.info("instances.shared", instances=len(files), source=str(self.directory))
            return False
        self._known = table
        return await asyncio.to_thread(_mirror, self.directory, table, files)

    async def _connection(self) -> asyncpg.Connection:
        """The connection, opened again (and listening again) if it was lost; after a loss the
        table is read again, since notifications may have been missed meanwhile."""
        if self._conn is None or self._conn.is_closed():
            reopened = self._conn is not None
            self._conn = await asyncpg.connect(self.url)
            await self._conn.add_listener(CHANNEL, self._notified)
            if reopened:  # changes may have been missed: the whole table next
                self._read_all_at = None
                self._pulls.set()
        return self._conn

    def _notified(self, conn: object, pid: int, channel: str, payload: str) -> None:
        if self._conn is not None and pid != self._conn.get_server_pid():
            self._pulls.set()  # another router's change (our own are known already)

    async def run(self) -> None:
        """Apply other routers' changes as they are notified, until cancelled. A connection lost
        meanwhile is noticed within CHECK_S, opened again, and the table read again."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pulls.wait(), CHECK_S)
            if not self._pulls.is_set() and self._conn is not None and not self._conn.is_closed():
                continue
            self._pulls.clear()
            if self._unpushed:  # a change of ours the database did not take: it goes first
                await self.push()
                if self._unpushed:
                    await asyncio.sleep(1)
                    self._pulls.set()
                    continue
            try:
                await self.pull()
            except DATABASE_ERRORS as exc:
                log.error("instances.sync_failed", database=redact_url(self.url), error=str(exc))
                await asyncio.sleep(1)
                self._pulls.set()  # again, on a new connection if this one is gone

    async def pull(self) -> None:
        """Take the table's changes into the files, and reload if any file changed."""
        async with self._lock:
            conn = await self._connection()
            if self._read_all_at is None or time.monotonic() - self._read_all_at > FULL_READ_S:
                self._seen, table = await _read_all(conn)
                self._read_all_at = time.monotonic()
                changes = None
            else:
                self._seen, changes = await _changes_since(conn, self._seen)
        if changes is None:
            if table == self._known:
                return
            files = await asyncio.to_thread(read_directory, self.directory)
            self._known = table
            changed = await asyncio.to_thread(_mirror, self.directory, table, files)
        else:
            changes = {name: text for name, text in changes.items() if self._known.get(name) != text}
            if not changes:
                return
            self._learn(changes)
            changed = await asyncio.to_thread(_mirror, self.directory, changes)
        if changed:
            await self._reload()

    async def push(self) -> None:
        """After a reload: what the files say now, into the table (changes only)."""
        if self._conn is None:
            return
        stamps, texts = await asyncio.to_thread(_changed_files, self.directory, self._stamps)
        upserts = {name: text for name, text in texts.items() if self._known.get(name) != text}
        deletes = self._known.keys() - stamps.keys()
        if upserts or deletes:
            try:
                async with self._lock:
                    await _write_rows(await self._connection(), upserts, deletes)
            except DATABASE_ERRORS as exc:
                log.error("instances.sync_failed", database=redact_url(self.url), error=str(exc))
                self._unpushed = True  # ``run`` tries again, before it takes anything from the table
                self._pulls.set()
                return
        self._unpushed = False
        self._learn({**texts, **dict.fromkeys(deletes)})
        self._stamps = stamps

    def _learn(self, changes: Mapping[str, str | None]) -> None:
        """The table now holds these texts (None: no such row)."""
        for name, text in changes.items():
            if text is None:
                self._known.pop(name, None)
            else:
                self._known[name] = text

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None


async def import_directory(url: str, directory: Path) -> int:
    """Every instance file of ``directory`` into the table (added or replaced); returns how many."""
    files = await asyncio.to_thread(read_directory, directory)
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        await _write_rows(conn, files, set())
    finally:
        await conn.close()
    return len(files)


async def export_directory(url: str, directory: Path) -> int:
    """Every instance in the table as a file in ``directory``; returns how many. Only reads:
    a database no router has used yet has no instances (and is left as it is)."""
    conn = await asyncpg.connect(url)
    try:
        made = await conn.fetchval("SELECT to_regclass('instances') IS NOT NULL")
        table = await _rows(conn) if made else {}
    finally:
        await conn.close()
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in table.items():
        await asyncio.to_thread(instance_files.write_atomically, directory / name, text)
    return len(table)
