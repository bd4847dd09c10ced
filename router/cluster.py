"""What changes when routers share a PostgreSQL database (``ROUTER_DATABASE_URL``): the queue
store, the instances mirrored from the database, the WebSocket relay. One place turns a database
that cannot be used into the error the operator sees, naming the setting and never its password.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from router.errors import ConfigError
from router.live_relay import LiveRelay, Publish
from router.redact import redact_url
from router.settings import Settings
from router.shared_instances import SharedInstances
from router.store import QueueStore, SqliteStore
from router.store.pg_schema import DATABASE_ERRORS


@asynccontextmanager
async def database_errors(url: str) -> AsyncIterator[None]:
    """A database that cannot be reached or used, as a configuration error naming the setting."""
    try:
        yield
    except DATABASE_ERRORS as exc:
        raise ConfigError([f"ROUTER_DATABASE_URL: cannot use {redact_url(url)}: {exc}"]) from exc


def database_path(settings: Settings) -> Path | str:
    """Where the queue is (``Settings.queue``): the SQLite file, or the PostgreSQL URL."""
    return settings.queue


async def open_store(settings: Settings, node: str) -> QueueStore:
    """The shared PostgreSQL queue when ``ROUTER_DATABASE_URL`` is set, else the SQLite file."""
    url = settings.router_database_url
    if url is None:
        return await SqliteStore.open(settings.database_path, settings.router_dedup_window_s)
    from router.store.postgres import PostgresStore  # noqa: PLC0415 - only when asked for

    async with database_errors(url):
        return await PostgresStore.open(
            url, node, settings.router_lease_timeout_s, settings.router_dedup_window_s
        )


async def share_instances(
    url: str, directory: Path, reload: Callable[[], Awaitable[None]]
) -> SharedInstances:
    """The instances directory, made to agree with the database's table (see SharedInstances)."""
    shared = SharedInstances(url, directory, reload)
    async with database_errors(url):
        if await shared.start():
            await reload()
    return shared


async def start_relay(url: str, publish: Publish) -> LiveRelay:
    relay = LiveRelay(url, publish)
    async with database_errors(url):
        await relay.start()
    return relay
