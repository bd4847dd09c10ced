"""The ``whatsapp`` adapter: the router is the WhatsApp session itself (an optional extra).

An instance whose file says ``integration: WHATSAPP-WHATSMEOW`` gets a live session, made with
neonize (whatsmeow, the WhatsApp Web multi-device protocol). Its credentials live in
``{ROUTER_STATE_DIR}/whatsapp/<instance>.db``; pairing is by QR code (``qrcode.updated``), or by
pairing code when the instance has a ``number``. Instances with any other integration are fed by
the other adapters, as before.

Sessions follow the instance files: added, removed, or (after a logout) started again at the
next reload. One session failing never touches another or the router. What sessions produce goes
through intake in the order it came, like any adapter's events.

Without the extra installed, those instances are reported with the command that installs it;
every other instance works.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from router import logs
from router.adapters.whatsapp.ownership import ROUND_S, SAVE_EVERY_S, SessionOwnership
from router.errors import ConfigError, IntakeError
from router.instances import InstanceConfig
from router.intake import Intake
from router.settings import Settings

if TYPE_CHECKING:
    from router.adapters.whatsapp.session import Session

log = logs.get_logger("router.whatsapp")
INTEGRATION = "WHATSAPP-WHATSMEOW"
INSTALL = "pip install 'evolution-router[whatsapp]'"
BATCH_LIMIT = 500  # events accepted together
BACKLOG_WARNING = 10_000  # events waiting for intake; past it, a warning (nothing is dropped)
ACCEPT_RETRY_S = 1.0

Emitted = tuple[str, str, Any, str | None]  # (instance, wire name, data, sender)


def load() -> type[Session]:
    """The session class; ConfigError telling how to install it when the extra is missing."""
    try:
        from router.adapters.whatsapp.session import Session  # noqa: PLC0415 - optional extra
    except ImportError as exc:
        raise ConfigError(
            [f"integration {INTEGRATION} needs the optional WhatsApp library: {INSTALL} ({exc})"]
        ) from exc
    return Session


def wanted(instances: Mapping[str, InstanceConfig]) -> dict[str, InstanceConfig]:
    return {name: config for name, config in instances.items() if config.integration == INTEGRATION}


def check(instances: Mapping[str, InstanceConfig]) -> list[str]:
    """Problems for ``evolution-router check``: sessions configured, library missing."""
    names = sorted(wanted(instances))
    if not names:
        return []
    try:
        load()
    except ConfigError as exc:
        return [f"instances {', '.join(names)}: {problem}" for problem in exc.problems]
    return []


class WhatsAppSessions:
    """Owns the sessions and the pump that hands their events to intake."""

    def __init__(self, settings: Settings, intake: Intake) -> None:
        self.directory = settings.router_state_dir / "whatsapp"
        self.intake = intake
        # With PostgreSQL, several routers: each session runs on the one router that owns it.
        url = settings.router_database_url
        self.ownership = SessionOwnership(url, self._ownership_lost) if url else None
        self.sessions: dict[str, Session] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._queue: asyncio.Queue[Emitted | None] = asyncio.Queue()
        self._group: asyncio.TaskGroup | None = None
        self._configured: Mapping[str, InstanceConfig] = {}
        self._stop = asyncio.Event()
        self._stopping: set[asyncio.Task[None]] = set()
        self.refused = 0  # events intake could not take (logged)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Until ``stop``: then end every session and hand over what they emitted."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            pump = group.create_task(self._pump(), name="whatsapp pump")
            await self.apply(self._configured)  # what was applied before this ran
            saved = time.monotonic()
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), ROUND_S)
                if self.ownership is not None and not self._stop.is_set():
                    await self.apply(self._configured)  # sessions whose router died: take them
                    if time.monotonic() - saved >= SAVE_EVERY_S:
                        saved = time.monotonic()
                        await self._save_credentials()
            await asyncio.gather(*(session.stop() for session in self.sessions.values()))
            await asyncio.gather(*self._tasks.values())
            await self._save_credentials()  # stopped: the files are as the sessions left them
            self._queue.put_nowait(None)  # after the sessions' last events
            await pump
        if self.ownership is not None:
            await self.ownership.close()

    async def _save_credentials(self) -> None:
        if self.ownership is not None:
            for name in list(self.ownership.held):
                await self.ownership.save(name, self.directory / f"{name}.db")

    def _ownership_lost(self) -> None:
        """The database connection holding this router's sessions went: stop them all here."""
        for name in list(self.sessions):
            task = asyncio.get_running_loop().create_task(self.sessions.pop(name).stop())
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def apply(self, instances: Mapping[str, InstanceConfig]) -> None:
        """Start sessions for new instances (and ended ones), stop those no longer configured."""
        self._configured = instances
        configured = wanted(instances)
        for name in [name for name in self.sessions if name not in configured]:
            log.info("whatsapp.session_removed", instance=name)
            await self.sessions.pop(name).stop()
            if self.ownership is not None:
                await self.ownership.save(name, self.directory / f"{name}.db")
                await self.ownership.release(name)
        start = [name for name in configured if name not in self._tasks or self._tasks[name].done()]
        if not start or self._group is None or self._stop.is_set():
            return
        if self.ownership is not None:
            held = await self.ownership.claim(start)
            start = [name for name in start if name in held]
            if not start:
                return
            for name in start:  # the credentials the last router to run it saved
                await self.ownership.fetch(name, self.directory / f"{name}.db")
        try:
            session_class = load()
        except ConfigError as exc:
            log.error("whatsapp.unavailable", instances=start, error=exc.problems[0], hint=INSTALL)
            return
        for name in start:
            session = session_class(configured[name], self.directory / f"{name}.db", self._emit)
            self.sessions[name] = session
            self._tasks[name] = self._group.create_task(self._run(session), name=f"whatsapp {name}")

    async def _run(self, session: Session) -> None:
        try:
            await session.run()
        except Exception:  # a broken session must not end the others (nor the task group)
            log.exception("whatsapp.session_failed", instance=session.instance)
        if self.ownership is not None:  # ended (a logout, a failure): its file as it left it
            await self.ownership.save(session.instance, self.directory / f"{session.instance}.db")

    def _emit(self, instance: str, wire: str, data: Any, sender: str | None) -> None:
        self._queue.put_nowait((instance, wire, data, sender))
        if self._queue.qsize() == BACKLOG_WARNING:
            log.warning(
                "whatsapp.backlog", waiting=BACKLOG_WARNING, hint="intake is slower than the sessions"
            )

    async def _pump(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < BATCH_LIMIT and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            last = None in batch
            await self._accept([item for item in batch if item is not None])
            if last:
                return

    async def _accept(self, batch: list[Emitted]) -> None:
        events = []
        for instance, wire, data, sender in batch:
            envelope = {"event": wire, "instance": instance, "data": data, "sender": sender}
            try:
                events.append(self.intake.parse(envelope))
            except IntakeError as exc:  # e.g. a name RabbitMQ cannot route: it never will be
                self.refused += 1
                log.error("whatsapp.event_refused", instance=instance, _event=wire, error=str(exc))
        while events:
            try:
                await self.intake.accept(events, adapter="whatsapp")
                return
            except Exception:  # the store failed this once: keep the events, try again
                log.exception("whatsapp.accept_failed", count=len(events), retry_in_s=ACCEPT_RETRY_S)
                await asyncio.sleep(ACCEPT_RETRY_S)
