"""``GET /health``: the daemon is alive and serving. ``GET /ready``: it can do its work now.

``/ready`` answers 200 when the store takes a write and every enabled sink is reachable, and 503
otherwise (also once stopping has begun), with one entry per check::

    {"status": "not ready", "checks": {"store": {"ok": true},
     "rabbitmq": {"ok": false, "error": "broker unreachable: ConnectionRefusedError: ..."}}}

A sink that is down does not lose events (they wait in the store); ``/ready`` says so, so that
systemd, a load balancer or an operator sees it. Each check has ``READY_TIMEOUT_S``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping
from typing import Any, Protocol

import orjson
from aiohttp import web

from router import __version__
from router.delivery import Dispatcher
from router.errors import RouterError
from router.routing import Routes, Target
from router.sinks import BaseSink
from router.store import STORE_ERRORS, QueueStore


class HealthHost(Protocol):
    """What the health checks need of the daemon (``App`` is one)."""

    @property
    def stopping(self) -> bool: ...

    @property
    def store(self) -> QueueStore | None: ...

    @property
    def dispatcher(self) -> Dispatcher | None: ...

    @property
    def routes(self) -> Routes: ...


READY_TIMEOUT_S = 3.0


async def _outcome(check: Awaitable[Any]) -> str | None:
    """None if ``check`` passed, else why not."""
    try:
        await asyncio.wait_for(check, READY_TIMEOUT_S)
    except TimeoutError:
        return f"no answer within {READY_TIMEOUT_S:g} s"
    except (RouterError, *STORE_ERRORS) as exc:
        return str(exc)
    return None


async def check_sinks(sinks: Mapping[str, BaseSink], routes: Routes) -> dict[str, str | None]:
    """Every sink's ``check`` against its targets, at once: sink -> None (fine) or the problem."""
    targets: dict[str, list[Target]] = {name: [] for name in sinks}
    for target in routes.targets.values():
        targets.setdefault(target.sink, []).append(target)
    names = list(sinks)
    outcomes = await asyncio.gather(*(_outcome(sinks[name].check(targets[name])) for name in names))
    return dict(zip(names, outcomes, strict=True))


class Health:
    def __init__(self, app: HealthHost) -> None:
        self.app = app

    async def alive(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "version": __version__})

    async def ready(self, _: web.Request) -> web.Response:
        app = self.app
        if app.stopping:  # from SIGTERM until the server closes: take this one out of rotation
            return web.json_response({"status": "stopping", "checks": {}}, status=503)
        assert app.store is not None and app.dispatcher is not None, "served before start"
        store_problem = _outcome(app.store.probe())
        sinks_problems = check_sinks(app.dispatcher.sinks, app.routes)
        problems = {"store": await store_problem, **await sinks_problems}
        checks = {
            name: {"ok": True} if problem is None else {"ok": False, "error": problem}
            for name, problem in problems.items()
        }
        ready = all(problem is None for problem in problems.values())
        body = {"status": "ready" if ready else "not ready", "checks": checks}
        return web.Response(
            body=orjson.dumps(body), status=200 if ready else 503, content_type="application/json"
        )
