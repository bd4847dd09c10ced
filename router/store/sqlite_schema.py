"""The SQLite queue's schema, and the upgrades of files written by older routers.

``PRAGMA user_version`` is the schema's version: 1, delivery ids never reused (AUTOINCREMENT);
2, free pages given back in steps (``auto_vacuum=INCREMENTAL``); 3, ordering keys.
"""

from __future__ import annotations

import sqlite3

from router import logs

log = logs.get_logger("router.store")
SCHEMA_VERSION = 3

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
