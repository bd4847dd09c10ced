"""The PostgreSQL schema, as numbered migrations the router applies itself.

``router_schema`` lists the versions applied. A router applies the ones it knows that are
missing, in order, each in its own transaction, under an advisory lock so that routers starting
together do not race. A router started on a database a newer router already upgraded says so
and goes on (migrations only add).
"""

from __future__ import annotations

import asyncpg

from router import logs

log = logs.get_logger("router.store")
# What a call to the database raises when it cannot be used: unreachable, refusing, or the
# statement failing there. Every PostgreSQL part of the router catches this one tuple.
DATABASE_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)
MIGRATION_LOCK = 0x7E0C0DE  # pg_advisory_xact_lock key: one migrating router at a time
# Held by a transaction that changes ``instances`` (from before its first write, or from the
# change-log trigger) until it commits: changes are logged in the order they commit.
INSTANCES_LOCK = 0x7E0C0DF

MIGRATIONS: tuple[str, ...] = (
    # 1: the queue, as the SQLite store keeps it, plus who holds a lease and until when.
    """
    CREATE TABLE events (
        id          TEXT PRIMARY KEY,
        instance    TEXT NOT NULL,
        event       TEXT NOT NULL,
        data        BYTEA NOT NULL,
        date_time   TEXT NOT NULL,
        sender      TEXT,
        server_url  TEXT,
        apikey      TEXT,
        accepted_at DOUBLE PRECISION NOT NULL,
        chat        TEXT
    );
    CREATE TABLE deliveries (
        id          BIGSERIAL PRIMARY KEY,
        event_id    TEXT NOT NULL,
        target      TEXT NOT NULL,
        state       SMALLINT NOT NULL DEFAULT 0,
        due_at      DOUBLE PRECISION NOT NULL,
        attempts    INTEGER NOT NULL DEFAULT 0,
        last_error  TEXT,
        updated_at  DOUBLE PRECISION NOT NULL,
        okey        TEXT,
        leased_by   TEXT,
        lease_until DOUBLE PRECISION
    );
    CREATE INDEX deliveries_due ON deliveries (target, state, due_at);
    CREATE INDEX deliveries_event ON deliveries (event_id);
    CREATE INDEX deliveries_key ON deliveries (target, okey, id);
    CREATE INDEX deliveries_holder ON deliveries (leased_by) WHERE state = 1;
    CREATE TABLE attempt_errors (
        delivery_id BIGINT NOT NULL,
        attempt     INTEGER NOT NULL,
        at          DOUBLE PRECISION NOT NULL,
        error       TEXT NOT NULL
    );
    CREATE INDEX attempt_errors_delivery ON attempt_errors (delivery_id);
    CREATE TABLE seen_ids (id TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL);
    CREATE INDEX seen_ids_at ON seen_ids (at);
    CREATE TABLE checkpoints (source TEXT PRIMARY KEY, position TEXT NOT NULL);
    CREATE TABLE probe (id INTEGER PRIMARY KEY CHECK (id = 1), at DOUBLE PRECISION NOT NULL);
    """,
    # 2: instance configuration, shared by every router (the YAML of one instance file each).
    """
    CREATE TABLE instances (
        name       TEXT PRIMARY KEY,
        yaml       TEXT NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    """,
    # 3: events too large for a NOTIFY, relayed to other routers' WebSocket clients (kept 60 s).
    """
    CREATE TABLE live_events (
        id   BIGSERIAL PRIMARY KEY,
        body BYTEA NOT NULL,
        at   DOUBLE PRECISION NOT NULL
    );
    """,
    # 4: live WhatsApp sessions' credential files, so the router that takes a session over has them.
    """
    CREATE TABLE whatsapp_sessions (
        name       TEXT PRIMARY KEY,
        db         BYTEA NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    """,
    # 5: a log of changed instance names, written by a trigger whoever writes the table (older
    # routers too), so a router reads what changed since it last looked, not the whole table.
    f"""
    CREATE TABLE instance_changes (
        seq  BIGSERIAL PRIMARY KEY,
        name TEXT NOT NULL,
        at   DOUBLE PRECISION NOT NULL
    );
    CREATE FUNCTION log_instance_change() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock({INSTANCES_LOCK});
        INSERT INTO instance_changes (name, at) VALUES (
            CASE WHEN TG_OP = 'DELETE' THEN OLD.name ELSE NEW.name END,
            extract(epoch FROM clock_timestamp())
        );
        RETURN NULL;
    END $$;
    CREATE TRIGGER instances_logged AFTER INSERT OR UPDATE OR DELETE ON instances
        FOR EACH ROW EXECUTE FUNCTION log_instance_change();
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


async def migrate(conn: asyncpg.Connection) -> int:
    """Bring the database up to ``SCHEMA_VERSION``; returns the version it is at."""
    async with conn.transaction():  # routers starting together: one creates it, under the lock
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS router_schema"
            " (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL)"
        )
    for version, sql in enumerate(MIGRATIONS, start=1):
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            done = await conn.fetchval("SELECT 1 FROM router_schema WHERE version = $1", version)
            if done:
                continue
            await conn.execute(sql)
            await conn.execute("INSERT INTO router_schema (version, applied_at) VALUES ($1, now())", version)
            log.info("store.migrated", version=version)
    newest = int(await conn.fetchval("SELECT MAX(version) FROM router_schema"))
    if newest > SCHEMA_VERSION:
        log.warning("store.schema_newer", version=newest, known=SCHEMA_VERSION, hint="upgrade this router")
    return newest
