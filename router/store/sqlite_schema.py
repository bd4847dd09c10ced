"""The SQLite queue's file: how it is opened, its schema, and the upgrades of files written by
older routers.

``PRAGMA user_version`` is the schema's version: 1, delivery ids never reused (AUTOINCREMENT);
2, free pages given back in steps (``auto_vacuum=INCREMENTAL``); 3, ordering keys.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from router import logs

log = logs.get_logger("router.store")
SCHEMA_VERSION = 3

# What a queue file writes, measured in system calls (events stored once, deleted once):
WRITE_SETTINGS = (
    # Each operation runs in a savepoint, whose journal (the pages it changes, as they were)
    # is kept in memory; in a temporary file it was a write of every such page.
    "temp_store=MEMORY",
    # Builds with SQLITE_SECURE_DELETE (Debian's, Ubuntu's) zero every deleted row and write
    # every page that a delete frees. FAST zeroes deleted rows in pages written anyway and
    # leaves freed pages unwritten (the file gives them back: ``auto_vacuum``).
    "secure_delete=FAST",
    # A page is copied from the log into the file once per checkpoint, however often it was
    # written in between; a queue rewrites the same pages all the time. 16 MiB of log.
    "wal_autocheckpoint=4000",
    # 16 MiB of pages in memory (2 by default): a burst's event rows are still there when
    # their acks delete them, not read back.
    "cache_size=-16000",
)

DELIVERIES = (
    """CREATE TABLE IF NOT EXISTS deliveries (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id   TEXT NOT NULL,
    target     TEXT NOT NULL,
    state      INTEGER NOT NULL DEFAULT 0,
    due_at     REAL NOT NULL,
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    updated_at REAL NOT NULL,
    okey       TEXT
)""",
    "CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (target, state, due_at)",
    "CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries (event_id)",
    "CREATE INDEX IF NOT EXISTS deliveries_key ON deliveries (target, okey)",
)
_V0_COLUMNS = "id, event_id, target, state, due_at, attempts, last_error, updated_at"

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id          TEXT PRIMARY KEY,
    instance    TEXT NOT NULL,
    event       TEXT NOT NULL,
    data        BLOB NOT NULL,
    date_time   TEXT NOT NULL,
    sender      TEXT,
    server_url  TEXT,
    apikey      TEXT,
    accepted_at REAL NOT NULL,
    chat        TEXT
);
{deliveries}
CREATE TABLE IF NOT EXISTS attempt_errors (
    delivery_id INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,
    at          REAL NOT NULL,
    error       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS attempt_errors_delivery ON attempt_errors (delivery_id);
CREATE TABLE IF NOT EXISTS seen_ids (
    id TEXT PRIMARY KEY,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS seen_ids_at ON seen_ids (at);
CREATE TABLE IF NOT EXISTS probe (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoints (
    source   TEXT PRIMARY KEY,
    position TEXT NOT NULL
);
""".format(deliveries=";\n".join(DELIVERIES) + ";")


def migrate(conn: sqlite3.Connection) -> None:
    """Upgrade a database written by an older router to ``SCHEMA_VERSION``, one step at a time."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version < 1:
        # Delivery ids were reused once the queue emptied, so a new dead letter could show an
        # old delivery's errors; ids now never repeat, and errors without a delivery go.
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ALTER TABLE deliveries RENAME TO deliveries_v0")
        conn.execute("DROP INDEX IF EXISTS deliveries_due")
        conn.execute("DROP INDEX IF EXISTS deliveries_event")
        for statement in DELIVERIES:
            conn.execute(statement)
        conn.execute(f"INSERT INTO deliveries ({_V0_COLUMNS}) SELECT {_V0_COLUMNS} FROM deliveries_v0")
        conn.execute("DROP TABLE deliveries_v0")
        conn.execute("DELETE FROM attempt_errors WHERE delivery_id NOT IN (SELECT id FROM deliveries)")
        conn.execute("PRAGMA user_version=1")
        conn.execute("COMMIT")
        log.info("store.migrated", version=1)
    if version < 2:
        # Free pages are given back in steps from now on; switching needs one full VACUUM.
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("VACUUM")
        conn.execute("PRAGMA user_version=2")
        log.info("store.migrated", version=2)
    if version < 3:
        # Ordering keys: a delivery's key, and the chat its event belongs to. Older rows have
        # none, so they are delivered as before, in no particular order.
        conn.execute("BEGIN IMMEDIATE")
        for table, column in (("deliveries", "okey"), ("events", "chat")):
            if column not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
        conn.execute("PRAGMA user_version=3")
        conn.execute("COMMIT")
        log.info("store.migrated", version=3)


def connect(path: Path) -> sqlite3.Connection:
    """The queue file at ``path`` (made if missing), in WAL mode, upgraded and set up for writing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'deliveries'").fetchone():
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")  # before the first table, or a VACUUM
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA foreign_keys=OFF")
    for setting in WRITE_SETTINGS:
        conn.execute(f"PRAGMA {setting}")
    migrate(conn)
    conn.executescript(SCHEMA)
    return conn
