"""The daemon. It owns every task; starting and stopping follow a written order.

Start: open the store, open the sinks (and check them), start the delivery workers, then intake
(HTTP with the admin API, jsonl, WhatsApp sessions) and the instance-file watcher, then emit
``application.startup`` and tell systemd ``READY=1``.

Reload (SIGHUP, a changed instance file, an admin API change): one at a time, under
``config_lock``; the routing index is swapped whole, and removed targets drain (see
``Dispatcher.apply``).

Stop (SIGTERM/SIGINT): tell systemd ``STOPPING=1``; 1. stop intake: no new events, requests
under way finish; stop watching and reloading; 2. stop leasing and give attempts under way
``ROUTER_SHUTDOWN_GRACE_S`` to finish (the rest stay stored and are retried at the next start);
3. write what the store has queued; 4. close the sinks, in reverse order of opening.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from router import __version__, instance_files, logs
from router.adapters import http
from router.adapters.jsonl import JsonlAdapter
from router.adapters.whatsapp import WhatsAppSessions
from router.admin import Admin, upstream_not_found
from router.bodies import close_marked
from router.cluster import database_path, open_store, share_instances, start_relay
from router.current import Current
from router.delivery import Dispatcher
from router.errors import RouterError
from router.events import Event, new_event_id, utc_timestamp
from router.health import Health, check_sinks
from router.instance_status import InstanceStatus
from router.instances import InstanceConfig, LoadResult, directory_fingerprint, load_instances
from router.intake import Intake
from router.live_relay import LiveRelay
from router.metrics import Metrics
from router.routing import Routes, build_routes, startup_targets
from router.settings import Settings
from router.shared_instances import SharedInstances
from router.sinks import BaseSink
from router.sinks.registry import build_sinks
from router.store import STORE_ERRORS, QueueStore
from router.systemd import Notifier

if TYPE_CHECKING:
    from router.sinks.websocket import WebSocketHub

__all__ = ["App", "database_path"]  # database_path: where the queue is, for tools and tests

log = logs.get_logger("router.app")
DEFAULT_API_KEYS = frozenset({"change-me", "429683C4C977415CAAFCCE10F7D57E11"})
# Connections the kernel holds for the daemon until it accepts them (capped by the kernel's
# net.core.somaxconn). Upstream posts each event as it happens, a connection per request under
# way: a burst of them while the event loop is busy waits here, where the usual 128 would have
# the rest dropped and retried a second later.
LISTEN_BACKLOG = 4096


class App:
    """``await App(settings).run()`` runs the daemon until ``stop()`` or SIGTERM."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        settings.router_instances_dir.mkdir(parents=True, exist_ok=True)  # the admin API writes here
        loaded = load_instances(settings.router_instances_dir)
        for problem in loaded.problems:
            log.error("config.invalid", problem=problem)
        self.instances = loaded.instances
        self.instance_paths = loaded.files
        # What each file gave: the next reload reads only the files that changed since.
        self._loaded: LoadResult | None = loaded
        self._forget_secrets()
        self._fingerprint = loaded.fingerprint
        # Held while instance files are written or read and the routes swapped: one change at a time.
        self.config_lock = asyncio.Lock()
        self.reloads = 0  # completed, for tests and operators' curiosity
        self.current = Current(build_routes(settings, self.instances))
        self.started = asyncio.Event()
        self.port: int | None = None
        self.intake: Intake | None = None
        self.dispatcher: Dispatcher | None = None
        self.websocket: WebSocketHub | None = None
        self.store: QueueStore | None = None
        self.whatsapp: WhatsAppSessions | None = None
        self.shared: SharedInstances | None = None  # with PostgreSQL: instances kept in the database
        self.metrics = Metrics()
        self.node = settings.node_name  # once: without a fixed port it is made up at each call
        store_kind = "postgresql" if settings.router_database_url else "sqlite"
        self.metrics.info.labels(self.node, store_kind).set(1)
        self.status = InstanceStatus()  # connections, from the events accepted
        self.systemd = Notifier(settings)
        self._stopping = asyncio.Event()
        self._reload = asyncio.Event()

    def stop(self) -> None:
        self._stopping.set()

    @property
    def routes(self) -> Routes:
        return self.current.routes

    def _forget_secrets(self) -> None:
        """No log line may show a secret of the settings or of any instance."""
        logs.set_secrets(self._secrets(self.instances))

    def _secrets(self, instances: Mapping[str, InstanceConfig]) -> list[str]:
        return [*self.settings.secret_values(), *(v for c in instances.values() for v in c.secret_values())]

    def _prepare_reload(
        self,
    ) -> tuple[LoadResult, dict[str, InstanceConfig], dict[str, Path], Routes, list[str]]:
        """In a thread: the instance files read again (those changed), the index, the secrets.
        A file that no longer validates keeps its instance's previous configuration."""
        loaded = load_instances(self.settings.router_instances_dir, self._loaded)
        instances, paths = dict(loaded.instances), dict(loaded.files)
        for name in loaded.failed_names:
            if name in self.instances and name not in instances:
                instances[name] = self.instances[name]
                paths[name] = self.instance_paths[name]
        routes = build_routes(self.settings, instances)
        return loaded, instances, paths, routes, self._secrets(instances)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def request_reload(self) -> None:
        self._reload.set()

    async def run(self, install_signals: bool = False) -> None:
        settings = self.settings
        if install_signals:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, self.stop)
            loop.add_signal_handler(signal.SIGINT, self.stop)
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        if settings.authentication_api_key in DEFAULT_API_KEYS:
            log.warning("config.default_api_key", hint="set AUTHENTICATION_API_KEY")

        store = await open_store(settings, self.node)
        try:
            if settings.router_database_url:  # instances live in the database: mirror them here
                directory = settings.router_instances_dir
                self.shared = await share_instances(settings.router_database_url, directory, self.reload)
            async with contextlib.AsyncExitStack() as sinks_stack:
                sinks = build_sinks(settings)
                for sink in sinks.values():
                    await sinks_stack.enter_async_context(sink)
                await self._check_sinks(sinks)
                await self._serve(store, sinks)
        finally:
            if self.shared is not None:
                await self.shared.close()
            store.shutdown()
        log.info("router.stopped")

    async def _check_sinks(self, sinks: Mapping[str, BaseSink]) -> None:
        """Say at start what cannot work (bad credentials, no broker); the daemon still runs and
        keeps the events until it can."""
        for name, error in (await check_sinks(sinks, self.routes)).items():
            if error is not None:
                log.error("sink.unusable", sink=name, error=error, hint="events wait in the store")

    async def _serve(self, store: QueueStore, sinks: Mapping[str, BaseSink]) -> None:
        settings = self.settings
        dispatcher = Dispatcher(store, sinks, self.current, settings, self.metrics)
        live: Callable[[Sequence[Event]], None] | None = None
        relay: LiveRelay | None = None
        if settings.websocket_enabled:
            # python-socketio is imported only when the WebSocket sink is on (a tenth of a start)
            from router.sinks.websocket import WebSocketHub  # noqa: PLC0415

            self.websocket = WebSocketHub(settings, self.current)
            live = self.websocket.publish
            if settings.router_database_url:  # clients of every router see every router's events
                relay = await start_relay(settings.router_database_url, self.websocket.publish)
                live = relay.publish
        intake = Intake(
            store,
            settings,
            self.current,
            status=self.status,
            handoff=dispatcher,
            live=live,
            metrics=self.metrics,
        )
        self.dispatcher, self.intake, self.store = dispatcher, intake, store

        async with asyncio.TaskGroup() as tasks:
            store_task = tasks.create_task(store.run(), name="store")
            dispatch_task = tasks.create_task(
                dispatcher.run(settings.router_shutdown_grace_s), name="dispatcher"
            )
            runner = await self._start_http(intake)
            jsonl = None
            if settings.router_jsonl_path:
                jsonl = JsonlAdapter(intake, settings.router_jsonl_path)
                tasks.create_task(jsonl.run(), name="jsonl")
            reload_task = tasks.create_task(self._reload_on_request(), name="reload")
            self.whatsapp = WhatsAppSessions(settings, intake)
            await self.whatsapp.apply(self.instances)
            whatsapp_task = tasks.create_task(self.whatsapp.run(), name="whatsapp")
            shared_task = (
                tasks.create_task(self.shared.run(), name="shared instances") if self.shared else None
            )
            relay_task = tasks.create_task(relay.run(), name="live relay") if relay else None
            watchdog_task = tasks.create_task(self.systemd.keep_watchdog_fed(), name="watchdog")
            stop_watching = anyio.Event()
            watch_task = tasks.create_task(
                instance_files.watch(settings.router_instances_dir, self._reload_if_changed, stop_watching),
                name="watch instances",
            )

            await self._emit_startup(intake)
            log.info(
                "router.started",
                port=self.port,
                targets=len(self.routes.targets),
                instances=len(self.instances),
                version=__version__,
            )
            self.started.set()
            self.systemd.ready(self._status())
            await self._stopping.wait()

            log.info("router.stopping")
            self.systemd.stopping()
            # 1. Stop intake; requests under way finish (the store still runs for them).
            if self.websocket is not None:
                await self.websocket.close_all()
            await runner.cleanup()
            if jsonl is not None:
                jsonl.stop()
            self.whatsapp.stop()  # sessions end; what they emitted is stored first
            await whatsapp_task
            reload_task.cancel()
            for task in (shared_task, relay_task):
                if task is not None:
                    task.cancel()
            if relay is not None:
                await relay.close()
            stop_watching.set()
            await watch_task
            watchdog_task.cancel()
            # 2. Stop leasing; attempts under way get the grace period.
            dispatcher.stop()
            await dispatch_task
            # 3. Write everything queued (acks, retries) and stop the store.
            await store.close()
            await store_task

    async def _start_http(self, intake: Intake) -> web.AppRunner:
        settings = self.settings
        app = web.Application(
            client_max_size=settings.router_ingest_max_bytes, middlewares=[upstream_not_found]
        )
        app.on_response_prepare.append(close_marked)
        http.add_routes(app, intake)
        Admin(self).add_routes(app)
        health = Health(self)
        app.router.add_get("/health", health.alive)
        app.router.add_get("/ready", health.ready)
        app.router.add_get("/metrics", self._metrics)
        if self.websocket is not None:
            self.websocket.add_routes(app)  # last: /{instance} must not shadow the paths above
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=settings.router_shutdown_grace_s)
        await runner.setup()
        site = web.TCPSite(
            runner, settings.server_host, settings.server_port, reuse_address=True, backlog=LISTEN_BACKLOG
        )
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else settings.server_port
        return runner

    async def _metrics(self, _: web.Request) -> web.Response:
        metrics = self.metrics
        try:  # the queue's figures as the store tells them; the last ones while it cannot
            if self.store is not None:
                metrics.set_store_state(await self.store.sink_state())
            if self.dispatcher is not None:
                metrics.idle.set(1 if await self.dispatcher.idle() else 0)
        except (RouterError, *STORE_ERRORS) as exc:
            log.warning("metrics.store_unavailable", error=str(exc))
        if self.dispatcher is not None:
            metrics.in_flight.set(sum(worker.in_flight for worker in self.dispatcher.workers.values()))
        if self.websocket is not None:
            hub = self.websocket
            metrics.websocket_clients.set(len(hub.clients) + sum(hub.sio_clients.values()))
            metrics.websocket_slow_disconnects.set(hub.slow_disconnects)
        for name, sink in (self.dispatcher.sinks if self.dispatcher is not None else {}).items():
            if sink.connected is not None:
                metrics.sink_connected.labels(name).set(1 if sink.connected else 0)
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _emit_startup(self, intake: Intake) -> None:
        data = {
            "status": "started",
            "version": __version__,
            "server_name": self.settings.server_name,
        }
        event = Event(
            id=new_event_id(),
            instance=self.settings.server_name,
            event="application.startup",
            data=orjson.dumps(data),
            date_time=utc_timestamp(),
            server_url=self.settings.server_url,
        )
        await intake.emit(event, startup_targets(self.routes))

    async def _reload_on_request(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            await self.reload(every_file=True)  # SIGHUP: the operator asks for everything again

    async def _reload_if_changed(self) -> None:
        """The watcher saw changes: reload unless the files are as last loaded (our own writes)."""
        directory = self.settings.router_instances_dir
        if await asyncio.to_thread(directory_fingerprint, directory) != self._fingerprint:
            await self.reload()

    async def reload(self, every_file: bool = False) -> None:
        """Read the instance files again (those changed, or ``every_file``); a file that does not
        validate keeps its previous config."""
        async with self.config_lock:
            self.systemd.reloading()
            try:
                if every_file:
                    self._loaded = None
                await self.reload_locked()
            finally:
                self.systemd.ready(self._status())

    def _status(self) -> str:
        """One line for ``systemctl status``."""
        return (
            f"serving on port {self.port}: {len(self.instances)} instances,"
            f" {len(self.routes.targets)} delivery targets"
        )

    async def reload_locked(self) -> None:
        """``reload`` for a caller that holds ``config_lock`` (the admin API, after a write)."""
        # Reading the files that changed, building the index and the secrets take a while with
        # thousands of instances: off the event loop, so deliveries go on meanwhile; the loop
        # only swaps the results in.
        started = time.perf_counter()
        loaded, instances, paths, routes, secrets = await asyncio.to_thread(self._prepare_reload)
        prepared = time.perf_counter()
        for problem in loaded.problems:
            log.error("config.invalid", problem=problem, hint="previous configuration kept")
        self.instances, self.instance_paths, self._fingerprint = instances, paths, loaded.fingerprint
        self._loaded = loaded
        logs.set_secrets(secrets)
        self.current.routes = routes  # in force for every reader
        if self.dispatcher is not None:
            await self.dispatcher.apply()
        if self.whatsapp is not None:
            await self.whatsapp.apply(instances)
        if self.shared is not None:
            await self.shared.push()  # the admin API's or an operator's change, for every router
        self.reloads += 1
        done = time.perf_counter()
        self.metrics.reloads.inc()
        self.metrics.reload_seconds.labels("total").set(done - started)
        self.metrics.reload_seconds.labels("loop").set(done - prepared)
        log.info(
            "config.reloaded",
            instances=len(instances),
            targets=len(self.routes.targets),
            seconds=round(done - started, 3),
            loop_ms=round((done - prepared) * 1000, 1),
        )
